"""Lenses: ways to read a two-token margin out of residual streams captured at the answer position.

- :mod:`~dipreg.lenses.base`: the :class:`Lens` interface every lens implements;
- :mod:`~dipreg.lenses.logit`: the logit lens (final norm + two unembedding rows);
- :mod:`~dipreg.lenses.causal`: the causal (patchscope) lens, a transplant into a neutral context;
- :mod:`~dipreg.lenses.tuned`: the tuned lens (one affine translator per layer) and
  :mod:`~dipreg.lenses.tuned_training` that trains it.

Every lens is built by name through :data:`LENSES` (``lens="logit" | "causal" | "tuned"``); new lenses register
there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dipreg.adapter import ModelAdapter
from dipreg.lenses.base import Lens
from dipreg.lenses.causal import CausalLens
from dipreg.lenses.logit import LogitLens
from dipreg.lenses.tuned import TunedLens, load_tuned_lens

__all__ = ["LENSES", "CausalLens", "Lens", "LensFactory", "LogitLens", "TunedLens", "resolve_lens"]

LensFactory = Callable[..., Lens]


def _logit_lens(adapter: ModelAdapter, tokenizer: Any, **options: Any) -> Lens:
    """The logit lens; it has no options, so any option given is a mistake worth naming (not silently dropped)."""
    if options:
        raise ValueError(f"The logit lens takes no options; got {', '.join(sorted(options))}.")
    return LogitLens()


#: name -> factory ``(adapter, tokenizer, **options) -> Lens``
LENSES: dict[str, LensFactory] = {
    "logit": _logit_lens,
    "causal": lambda adapter, tokenizer, **options: CausalLens(adapter, tokenizer, **options),
    "tuned": lambda adapter, tokenizer, **options: load_tuned_lens(adapter, **options),
}


def resolve_lens(lens: str | Lens, adapter: ModelAdapter, tokenizer: Any, **options: Any) -> Lens:
    """Turn a lens name (or an already built lens) into a :class:`Lens`."""
    if isinstance(lens, Lens):
        return lens
    if lens not in LENSES:
        raise ValueError(f"Unknown lens {lens!r}; choose one of: {', '.join(LENSES)}.")
    return LENSES[lens](adapter, tokenizer, **options)
