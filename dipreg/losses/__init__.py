"""Auxiliary training losses (installed as ``dipreg.losses``): the base :class:`AuxLoss` and the wrong-margin
hinges, one per lens the margin is read through (logit, causal, tuned).

A loss never runs a forward of its own for the residuals it reads: :class:`BatchView` carries what the training
forward captured. Every hinge is a :class:`WrongMarginHinge` (the causal and tuned ones subclass it), registered by
its lens's name in :data:`HINGES`; :data:`HINGE_WINDOW` is their default window. This package imports neither
Lightning nor the training code.
"""

from __future__ import annotations

import importlib

from dipreg.losses.base import HINGE_WINDOW, AuxLoss, BatchView
from dipreg.losses.causal import CausalMarginHinge
from dipreg.losses.logit import WrongMarginHinge
from dipreg.losses.tuned import TunedMarginHinge

__all__ = [
    "HINGES",
    "HINGE_WINDOW",
    "AuxLoss",
    "BatchView",
    "CausalMarginHinge",
    "TunedMarginHinge",
    "WrongMarginHinge",
    "loss_class",
]

#: lens name -> the wrong-margin hinge read through that lens.
HINGES: dict[str, type[WrongMarginHinge]] = {
    "logit": WrongMarginHinge,
    "causal": CausalMarginHinge,
    "tuned": TunedMarginHinge,
}


def loss_class(class_path: str) -> type:
    """The class a recipe's ``class_path`` names: a dotted import path (``dipreg.losses.CausalMarginHinge``, or a
    user's ``mypackage.MyHinge``), or the bare name of a class in this package (``CausalMarginHinge``).

    Raises:
        ValueError: nothing importable has that name; the message names it.
    """
    if "." not in class_path:
        found = globals().get(class_path)
        if isinstance(found, type):
            return found
        raise ValueError(
            f"Unknown loss class {class_path!r}: give a dotted class_path (e.g. dipreg.losses.WrongMarginHinge)."
        )
    module_name, _, name = class_path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"class_path {class_path!r} names nothing importable ({err}).") from err
    if not isinstance(found, type):
        raise ValueError(f"class_path {class_path!r} names {type(found).__name__}, not a class.")
    return found
