"""dipreg: watch and repair how a language model assembles its answers.

Public surface (the README's "Python API"; the method and its definitions: ``docs/method.md``): :func:`load_model`,
:func:`trajectories`, :mod:`dipreg.stimuli`, :class:`ModelAdapter`; training, callbacks and eval live in their own
subpackages.
"""

from dipreg.adapter import ModelAdapter
from dipreg.architectures import UnsupportedModelError
from dipreg.lenses import LENSES, Lens, LogitLens
from dipreg.models import ModelLoadError, load_model
from dipreg.semantic import semantic_trajectories
from dipreg.trajectory import Trajectories, trajectories, trajectories_by_lens

__all__ = [
    "LENSES",
    "DipRegModule",
    "HeldOutEval",
    "Lens",
    "LogitLens",
    "ModelAdapter",
    "ModelLoadError",
    "PairDataModule",
    "Trajectories",
    "UnsupportedModelError",
    "load_model",
    "semantic_trajectories",
    "trajectories",
    "trajectories_by_lens",
]
__version__ = "0.1.0"

#: Public names served lazily so that `import dipreg` does not import Lightning.
_LAZY = {
    "DipRegModule": "dipreg.training.module",
    "PairDataModule": "dipreg.training.data",
    "HeldOutEval": "dipreg.callbacks.heldout",
    "losses": "dipreg.losses",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(_LAZY[name])
        return module if name == "losses" else getattr(module, name)
    raise AttributeError(f"module 'dipreg' has no attribute {name!r}")
