"""The lens interface: read a two-token margin at every layer out of residuals captured at the answer position.

Every lens has the same call: residuals ``(L, N, D)`` (the output of each decoder block at the last token of each
context) and the two candidate token ids per context in, margins ``(L, N)`` out. Only the two unembedding rows are
ever read. Implementations: :mod:`~dipreg.lenses.logit`, :mod:`~dipreg.lenses.causal`, :mod:`~dipreg.lenses.tuned`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

from dipreg.adapter import ModelAdapter


@runtime_checkable
class Lens(Protocol):
    """A per-layer margin reader."""

    name: str

    def margins(self, adapter: ModelAdapter, residuals: Tensor, pos_ids: Tensor, neg_ids: Tensor) -> Tensor:
        """Return ``(L, N)`` margins ``logit(t_pos) − logit(t_neg)`` read at every layer."""
        ...
