"""nnterp's built-in lenses: ``logit_lens`` and ``patchscope_lens`` on a ``StandardizedTransformer``.

Both take prompts as text and return next-token probabilities over the full vocabulary, ``(B, L, V)``, on the CPU;
the margin a user gets from them is ``log p(t_pos) − log p(t_neg)`` (the log-softmax normaliser cancels, so it equals
the logit margin wherever neither probability underflows float32). nnterp reads the last position and requires left
padding; the patchscope target is dipreg's neutral prompt with the patch at its last token (index ``-1``), the same
transplant :class:`~dipreg.lenses.causal.CausalLens` makes.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from dipreg.adapter import ModelAdapter
from dipreg.bench.peers_tools import PeerInputs, pick


class NNterpRunner:
    """Logit-lens and patchscope margins through nnterp."""

    lenses = ("logit", "causal")

    def __init__(self, model: nn.Module, tokenizer: Any, inputs: PeerInputs) -> None:
        from nnterp import StandardizedTransformer
        from nnterp.interventions import TargetPrompt

        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.padding_side = "left"  # nnterp reads position -1 and refuses right padding
        self.model = StandardizedTransformer(ModelAdapter(model).causal_lm, tokenizer=tokenizer)
        self.target = TargetPrompt(inputs.neutral_prompt, -1)
        self.inputs = inputs

    @torch.no_grad()
    def margins(self, lens: str) -> Tensor:
        """``(2N, L)`` margins ``log p(t_pos) − log p(t_neg)`` from nnterp's probabilities."""
        from nnterp.interventions import logit_lens, patchscope_lens

        if lens not in self.lenses:
            raise ValueError(f"nnterp offers no {lens!r} lens here; it has: {', '.join(self.lenses)}.")
        out = torch.empty(self.inputs.num_contexts, self.model.num_layers)
        for batch in self.inputs.batches:
            if lens == "logit":
                probs = logit_lens(self.model, batch.texts)
            else:
                probs = patchscope_lens(self.model, source_prompts=batch.texts, target_patch_prompts=self.target)
            probs = probs.transpose(0, 1)  # (L, B, V)
            pos = pick(probs, self.inputs.pos_ids[batch.rows])
            neg = pick(probs, self.inputs.neg_ids[batch.rows])
            out[batch.rows] = (pos.log() - neg.log()).T
        return out
