"""Auxiliary training losses that read the residual stream of the training forward pass.

An auxiliary loss subclasses :class:`AuxLoss` (a ``name``, a non-negative ``weight``, ``__call__(view) -> scalar``);
:class:`~dipreg.module.DipRegModule` adds ``weight · loss`` to the answer-token CE. The losses never run a forward
pass of their own: :class:`BatchView` carries the residuals the module captured.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from dipreg.adapter import ModelAdapter
from dipreg.metrics import depth_mask, validate_window

__all__ = ["AuxLoss", "BatchView", "WrongMarginHinge"]


@dataclass(frozen=True)
class BatchView:
    """What an auxiliary loss may read about one training batch.

    Attributes:
        residuals: ``(L, B, D)`` output of every decoder block at each row's answer position (with gradients).
        correct_ids: ``(B,)`` the correct answer token of each row.
        wrong_ids: ``(B,)`` the competing (wrong) answer token of each row.
        adapter: handles on the model (final norm, unembedding, ``margin``).
    """

    residuals: Tensor
    correct_ids: Tensor
    wrong_ids: Tensor
    adapter: ModelAdapter


class AuxLoss(abc.ABC):
    """The base of an auxiliary loss: ``loss = CE + Σ weight · aux(view)``.

    Subclasses set ``name`` (the logged metric name), call ``super().__init__(weight)`` and implement
    ``__call__``. A YAML recipe lists them under ``model.aux_losses`` by ``class_path``.

    Args:
        weight: the loss weight (λ), a finite number >= 0.

    Example (a user-defined loss, no change to the module needed):
        >>> class FinalMarginBonus(AuxLoss):
        ...     name = "final_margin"
        ...     def __call__(self, view):
        ...         m = view.adapter.margin(view.residuals[-1], view.correct_ids, view.wrong_ids)
        ...         return torch.relu(1.0 - m).mean()
        >>> FinalMarginBonus(weight=0.1).weight
        0.1
    """

    name: str = "aux"

    def __init__(self, weight: float = 1.0) -> None:
        weight = float(weight)
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(
                f"{type(self).__name__}: weight (λ) must be a finite number >= 0, got {weight}. Use 0 to disable it."
            )
        self.weight = weight

    @abc.abstractmethod
    def __call__(self, view: BatchView) -> Tensor:
        """The unweighted loss, a scalar tensor connected to ``view.residuals``."""


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

    def __init__(self, window: tuple[float, float] = (0.30, 0.85), delta: float = 0.0, weight: float = 0.2) -> None:
        self.window = validate_window(window, "WrongMarginHinge window")
        self.delta = float(delta)
        if not math.isfinite(self.delta):
            raise ValueError(f"WrongMarginHinge: delta must be finite, got {delta}.")
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
