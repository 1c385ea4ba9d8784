"""Lenses: ways to read a two-token margin out of residual streams captured at the answer position.

Every lens has the same call: residuals ``(L, N, D)`` (the output of each decoder block at the last token of
each context) and the two candidate token ids per context in, margins ``(L, N)`` out. Only the two
unembedding rows are ever read. New lenses register themselves in :data:`LENSES`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from dipreg.adapter import ModelAdapter


@runtime_checkable
class Lens(Protocol):
    """A per-layer margin reader."""

    name: str

    def margins(self, adapter: ModelAdapter, residuals: Tensor, pos_ids: Tensor, neg_ids: Tensor) -> Tensor:
        """Return ``(L, N)`` margins ``logit(t_pos) − logit(t_neg)`` read at every layer."""
        ...


class LogitLens:
    """The logit lens: final norm and unembedding applied to every layer's residual (identity translator)."""

    name = "logit"

    def margins(self, adapter: ModelAdapter, residuals: Tensor, pos_ids: Tensor, neg_ids: Tensor) -> Tensor:
        """``U[t_pos]·N(h_ℓ) − U[t_neg]·N(h_ℓ)`` for every layer ``ℓ``."""
        return adapter.margin(residuals, pos_ids, neg_ids)


def _causal_lens(adapter: ModelAdapter, tokenizer: Any, **options: Any) -> Lens:
    from dipreg.patchscope import CausalLens

    return CausalLens(adapter, tokenizer, **options)


def _tuned_lens(adapter: ModelAdapter, tokenizer: Any, **options: Any) -> Lens:
    from dipreg.tuned_lens import load_tuned_lens

    return load_tuned_lens(adapter, **options)


LensFactory = Callable[..., Lens]
#: name -> factory ``(adapter, tokenizer, **options) -> Lens``
LENSES: dict[str, LensFactory] = {
    "logit": lambda adapter, tokenizer, **options: LogitLens(),
    "causal": _causal_lens,
    "tuned": _tuned_lens,
}


def resolve_lens(lens: str | Lens, adapter: ModelAdapter, tokenizer: Any, **options: Any) -> Lens:
    """Turn a lens name (or an already built lens) into a :class:`Lens`."""
    if isinstance(lens, Lens):
        return lens
    if lens not in LENSES:
        raise ValueError(f"Unknown lens {lens!r}; choose one of: {', '.join(LENSES)}.")
    return LENSES[lens](adapter, tokenizer, **options)
