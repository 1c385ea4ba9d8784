"""Auxiliary training losses (installed as ``dipreg.losses``): the base :class:`AuxLoss` and the wrong-margin
hinges, one per lens the margin is read through (logit, causal, tuned).

A loss never runs a forward of its own for the residuals it reads: :class:`BatchView` carries what the training
forward captured. This package imports neither Lightning nor the training code.
"""

from dipreg.losses.base import AuxLoss, BatchView
from dipreg.losses.causal import CausalMarginHinge
from dipreg.losses.logit import WrongMarginHinge
from dipreg.losses.tuned import TunedMarginHinge

__all__ = ["AuxLoss", "BatchView", "CausalMarginHinge", "TunedMarginHinge", "WrongMarginHinge"]
