"""A key/value cache of a token prefix that many sequences share: computed once, expanded (never copied) per batch.

The causal lens uses it for its neutral prompt; the residual capture uses it for the preamble every probe context
starts with (a chat template's system and user header is most of a short context). It reads the model; it never
changes the model or the stored cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import DynamicCache

from dipreg.adapter import ModelAdapter, eval_mode


class PrefixCache:
    """The backbone's key/value cache of ``ids``, computed in eval mode with the model's current weights.

    Args:
        adapter: the model adapter.
        ids: the prefix token ids (at least one).

    A cache is bound to the weights it saw when it was built: build a new one after changing them.
    """

    def __init__(self, adapter: ModelAdapter, ids: Sequence[int]) -> None:
        if not ids:
            raise ValueError("A prefix cache needs at least one token.")
        self.adapter = adapter
        self.ids = list(ids)
        self._data = self._compute()

    @torch.no_grad()
    def _compute(self) -> list[tuple[Tensor | None, ...]]:
        model = self.adapter.causal_lm
        with eval_mode(model):
            out = self.adapter.backbone(
                input_ids=torch.tensor([self.ids], device=self.adapter.input_device),
                # No config: a config-built cache gives sliding-window layers (Mistral, Gemma2) that keep only the
                # last `sliding_window` keys, while the mask still counts the whole prefix. Full layers keep every
                # key; the model's own sliding-window mask still limits what each token attends to.
                past_key_values=DynamicCache(),
                use_cache=True,
            )
        return [tuple(entry) for entry in out.past_key_values]

    def __len__(self) -> int:
        return len(self.ids)

    def layers(self) -> list[tuple[Tensor | None, ...]]:
        """The stored per-layer cache entries (keys, values, ...), batch size one."""
        return self._data

    def expanded(self, batch: int) -> DynamicCache:
        """A fresh cache holding the prefix for ``batch`` rows (expanded views: the stored one never changes)."""
        data = [
            (keys.expand(batch, *keys.shape[1:]), values.expand(batch, *values.shape[1:]), *rest)
            for keys, values, *rest in self._data
        ]
        return DynamicCache(ddp_cache_data=data)

    def attention_mask(self, suffix_mask: Tensor) -> Tensor:
        """The attention mask of prefix + suffix for a ``(B, T)`` suffix mask (the prefix is never padded)."""
        ones = torch.ones(suffix_mask.shape[0], len(self), dtype=suffix_mask.dtype, device=suffix_mask.device)
        return torch.cat([ones, suffix_mask], dim=1)
