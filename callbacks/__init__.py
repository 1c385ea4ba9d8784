"""Lightning callbacks that watch the wrong-dip during other people's fine-tunes (installed as dipreg.callbacks),
and :class:`TrainingHealth`, which stops a fit whose loss is non-finite or stuck at ``ln V``.

``dipreg.callbacks.hf.DipMonitorCallback`` is the same monitor for the HF ``Trainer``.
"""

from dipreg.callbacks.compression_retention import CompressionRetention
from dipreg.callbacks.dip_monitor import DipMonitor
from dipreg.callbacks.health import TrainingDivergedError, TrainingHealth
from dipreg.callbacks.heldout import HeldOutEval
from dipreg.callbacks.probe import DipProbe, MonitorSetupError

__all__ = [
    "CompressionRetention",
    "DipMonitor",
    "DipProbe",
    "HeldOutEval",
    "MonitorSetupError",
    "TrainingDivergedError",
    "TrainingHealth",
]
