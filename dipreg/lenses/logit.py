"""The logit lens: the model's own final norm and two unembedding rows applied to every layer's residual."""

from __future__ import annotations

from torch import Tensor

from dipreg.adapter import ModelAdapter


class LogitLens:
    """The logit lens: final norm and unembedding applied to every layer's residual (identity translator)."""

    name = "logit"

    def margins(self, adapter: ModelAdapter, residuals: Tensor, pos_ids: Tensor, neg_ids: Tensor) -> Tensor:
        """``U[t_pos]·N(h_ℓ) − U[t_neg]·N(h_ℓ)`` for every layer ``ℓ``."""
        return adapter.margin(residuals, pos_ids, neg_ids)
