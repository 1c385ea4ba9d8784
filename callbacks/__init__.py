"""Callbacks that watch the wrong-dip during other people's fine-tunes (installed as dipreg.callbacks), and
:class:`TrainingHealth`, which stops a fit whose loss is non-finite or stuck at ``ln V``.

:class:`DipTracker` is the monitor for any loop (plain PyTorch, Fabric); the Lightning :class:`DipMonitor` and
``dipreg.callbacks.hf.DipMonitorCallback`` (HF ``Trainer``) are shells over it. :class:`DipAlertRule` (any loop) and its
Lightning shell :class:`DipAlert` warn or stop when the dip regresses after accuracy saturated. Names are served
lazily, so that ``from dipreg.callbacks import DipTracker`` (or ``DipAlertRule``) does not import Lightning.
"""

import importlib

__all__ = [
    "CompressionRetention",
    "DipAlarm",
    "DipAlert",
    "DipAlertRule",
    "DipMonitor",
    "DipProbe",
    "DipReading",
    "DipTracker",
    "HeldOutEval",
    "MonitorSetupError",
    "TrainingDivergedError",
    "TrainingHealth",
]

#: The module that defines each public name.
_HOMES = {
    "CompressionRetention": "dipreg.callbacks.compression_retention",
    "DipAlarm": "dipreg.callbacks.alert",
    "DipAlert": "dipreg.callbacks.dip_alert",
    "DipAlertRule": "dipreg.callbacks.alert",
    "DipMonitor": "dipreg.callbacks.dip_monitor",
    "DipProbe": "dipreg.callbacks.probe",
    "DipReading": "dipreg.callbacks.tracker",
    "DipTracker": "dipreg.callbacks.tracker",
    "HeldOutEval": "dipreg.callbacks.heldout",
    "MonitorSetupError": "dipreg.callbacks.probe",
    "TrainingDivergedError": "dipreg.callbacks.health",
    "TrainingHealth": "dipreg.callbacks.health",
}


def __getattr__(name: str) -> object:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'dipreg.callbacks' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
