"""dipreg: watch and repair how a language model assembles its answers.

Public surface (DESIGN.md): :func:`load_model`, :func:`trajectories`, :mod:`dipreg.stimuli`,
:class:`ModelAdapter`; training, callbacks and eval live in their own subpackages.
"""

from dipreg.adapter import ModelAdapter, UnsupportedModelError
from dipreg.lenses import LENSES, Lens, LogitLens
from dipreg.models import ModelLoadError, load_model
from dipreg.trajectory import Trajectories, trajectories

__all__ = [
    "LENSES",
    "Lens",
    "LogitLens",
    "ModelAdapter",
    "ModelLoadError",
    "Trajectories",
    "UnsupportedModelError",
    "load_model",
    "trajectories",
]
__version__ = "0.1.0"
