"""nnsight as a researcher uses it for a logit lens: a ``LanguageModel`` around the HF model, one ``trace`` per batch
that reads every decoder layer's output and sends it through the final norm and ``lm_head`` (full vocabulary).

The peer is given its best documented settings: only the last position of each (left-padded) context goes through
the norm and the head, inside the trace, and one stacked tensor is saved. The layers, the final norm and the head
are found through dipreg's model adapter, so the same code serves every architecture dipreg supports; the head's
output is what ``lm_head`` returns (no final-logit softcap, as in nnsight's own examples).
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch
from torch import Tensor, nn

from dipreg.adapter import ModelAdapter
from dipreg.bench.peers_tools import PeerInputs, pick_margins


def _envoy(root: Any, module: nn.Module, names: dict[nn.Module, str]) -> Any:
    """The nnsight envoy of ``module``: the envoy tree mirrors the module tree, attribute by attribute."""
    return functools.reduce(getattr, names[module].split("."), root)


class NNsightRunner:
    """Logit-lens margins through an nnsight ``LanguageModel`` trace."""

    lenses = ("logit",)

    def __init__(self, model: nn.Module, tokenizer: Any, inputs: PeerInputs) -> None:
        from nnsight import LanguageModel

        adapter = ModelAdapter(model)
        names = {module: name for name, module in adapter.causal_lm.named_modules()}
        self.model = LanguageModel(adapter.causal_lm, tokenizer=copy.deepcopy(tokenizer))
        self.layers = [_envoy(self.model, layer, names) for layer in adapter.layers]
        self.norm = _envoy(self.model, adapter.final_norm, names)
        self.head = _envoy(self.model, adapter.lm_head, names)
        self.inputs = inputs
        self.device = adapter.device

    @torch.no_grad()
    def margins(self, lens: str = "logit") -> Tensor:
        """``(2N, L)`` logit-lens margins, layer ℓ read from the output of decoder layer ℓ."""
        if lens != "logit":
            raise ValueError(f"nnsight offers no {lens!r} lens here; it has: logit.")
        out = torch.empty(self.inputs.num_contexts, len(self.layers))
        for batch in self.inputs.batches:
            feed = {
                "input_ids": batch.input_ids.to(self.device),
                "attention_mask": batch.attention_mask.to(self.device),
            }
            with self.model.trace(feed):
                per_layer = []
                for layer in self.layers:
                    output = layer.output
                    hidden = output[0] if isinstance(output, tuple) else output
                    per_layer.append(self.head(self.norm(hidden[:, -1])))
                logits = torch.stack(per_layer).save()  # (L, B, V)
            out[batch.rows] = pick_margins(
                logits, self.inputs.pos_ids[batch.rows], self.inputs.neg_ids[batch.rows]
            ).T.cpu()
        return out
