"""Auxiliary training losses that read the residual stream of the training forward pass.

An auxiliary loss subclasses :class:`AuxLoss` (a ``name``, a non-negative ``weight``, ``__call__(view) -> scalar``);
:class:`~dipreg.training.module.DipRegModule` adds ``weight · loss`` to the answer-token CE. The losses never run a
forward pass of their own: :class:`BatchView` carries the residuals the module captured.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

from torch import Tensor

from dipreg.adapter import ModelAdapter
from dipreg.validation import validate_number

__all__ = ["HINGE_WINDOW", "AuxLoss", "BatchView"]

#: The relative-depth window ``(lo, hi)`` every wrong-margin hinge penalises by default (paper §6: 0.30 ≤ ℓ/L ≤ 0.85).
HINGE_WINDOW: tuple[float, float] = (0.30, 0.85)


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
        self.weight = validate_number(weight, f"{type(self).__name__}: weight (λ)", 0.0, hint="Use 0 to disable it.")

    @abc.abstractmethod
    def __call__(self, view: BatchView) -> Tensor:
        """The unweighted loss, a scalar tensor connected to ``view.residuals``."""
