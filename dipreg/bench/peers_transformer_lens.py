"""TransformerLens 4 as a researcher uses it for a logit lens: a ``TransformerBridge`` around the HF model,
``run_with_cache``, ``ActivationCache.accumulated_resid(apply_ln=True)`` and ``unembed`` (full vocabulary).

The peer is given its best documented settings: the cache is filtered to the residual hooks that
``accumulated_resid`` reads, and only the last position of each (left-padded) context is normalised and unembedded.
Booting the bridge switches the wrapped model to eager attention (TransformerLens needs it for its attention hooks):
wrap a copy of the model you keep.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from dipreg.adapter import ModelAdapter
from dipreg.bench.peers_tools import PeerInputs, pick_margins


def _residual_hooks(name: str) -> bool:
    # What accumulated_resid reads: every block's resid_pre and the last block's resid_post.
    return name.endswith("hook_resid_pre") or name.endswith("hook_resid_post")


class TransformerLensRunner:
    """Logit-lens margins through a TransformerLens ``TransformerBridge``."""

    lenses = ("logit",)

    def __init__(self, model: nn.Module, tokenizer: Any, inputs: PeerInputs) -> None:
        from transformer_lens.model_bridge import TransformerBridge

        name = getattr(model, "name_or_path", "") or type(model).__name__
        device = str(next(model.parameters()).device)
        # The bridge configures the tokenizer it is given (padding side, BOS): give it its own.
        self.bridge = TransformerBridge.boot_transformers(
            name, hf_model=model, tokenizer=copy.deepcopy(tokenizer), device=device
        )
        self.inputs = inputs
        self.device = device
        self.num_layers = ModelAdapter(model).num_layers

    @torch.no_grad()
    def margins(self, lens: str = "logit") -> Tensor:
        """``(2N, L)`` logit-lens margins, layer ℓ read from ``resid_pre`` of block ℓ (``final_post`` for ``L``)."""
        if lens != "logit":
            raise ValueError(f"TransformerLens offers no {lens!r} lens here; it has: logit.")
        out = torch.empty(self.inputs.num_contexts, self.num_layers)
        for batch in self.inputs.batches:
            _, cache = self.bridge.run_with_cache(
                batch.input_ids.to(self.device),
                attention_mask=batch.attention_mask.to(self.device),
                names_filter=_residual_hooks,
            )
            normed = cache.accumulated_resid(apply_ln=True, pos_slice=-1)  # (L + 1, B, D): embeddings first
            logits = self.bridge.unembed(normed[1:])  # (L, B, V)
            out[batch.rows] = pick_margins(
                logits, self.inputs.pos_ids[batch.rows], self.inputs.neg_ids[batch.rows]
            ).T.cpu()
        return out
