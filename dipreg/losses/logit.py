"""`WrongMarginHinge`: the dip regulariser read through the logit lens (paper §6)."""

from __future__ import annotations

import torch
from torch import Tensor

from dipreg.losses.base import HINGE_WINDOW, AuxLoss, BatchView
from dipreg.metrics import depth_mask
from dipreg.validation import validate_number, validate_window

__all__ = ["WrongMarginHinge"]


class WrongMarginHinge(AuxLoss):
    """The dip regulariser: penalise mid-depth layers whose logit lens prefers the wrong answer.

    For every row with correct token ``c`` and wrong token ``w`` and every layer ``ℓ`` with
    ``lo ≤ ℓ/L ≤ hi``: ``relu(δ − (lens_ℓ[c] − lens_ℓ[w]))``, averaged over layers and rows.

    Args:
        window: relative-depth window ``(lo, hi)`` within ``[0, 1]``.
        delta: the margin ``δ`` a layer must reach to cost nothing.
        weight: ``λ`` (>= 0).

    Example:
        >>> hinge = WrongMarginHinge(window=(0.30, 0.85), delta=0.0, weight=0.2)
        >>> hinge.name
        'hinge'
    """

    name = "hinge"

    def __init__(self, window: tuple[float, float] = HINGE_WINDOW, delta: float = 0.0, weight: float = 0.2) -> None:
        self.window = validate_window(window, "WrongMarginHinge window")
        self.delta = validate_number(delta, "WrongMarginHinge: delta")
        super().__init__(weight)

    def __repr__(self) -> str:
        return f"WrongMarginHinge(window={self.window}, delta={self.delta}, weight={self.weight})"

    def window_layers(self, num_layers: int) -> list[int]:
        """0-based indices of the blocks whose relative depth ``ℓ/L`` lies in the window."""
        return [int(i) for i in depth_mask(num_layers, self.window).nonzero().flatten()]

    def window_margins(self, view: BatchView, layers: list[int]) -> Tensor:
        """``(len(layers), B)`` margins ``correct − wrong`` read at the given blocks. This hinge reads the logit lens
        (final norm and two unembedding rows of ``view.residuals``); subclasses read through another lens."""
        return view.adapter.margin(view.residuals[layers], view.correct_ids, view.wrong_ids)

    def __call__(self, view: BatchView) -> Tensor:
        """Mean hinge over the window's layers and the batch rows (zero, still in the graph, if no layer is
        in the window)."""
        layers = self.window_layers(view.residuals.shape[0])
        if not layers:
            return view.residuals.sum() * 0.0
        return torch.relu(self.delta - self.window_margins(view, layers)).mean()
