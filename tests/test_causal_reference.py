"""The causal (patchscope) lens of ``dipreg.trajectories(..., lens="causal")`` against a reference written here from
the definition in docs/method.md, sharing no helper with dipreg: no adapter, no batching, no prompt rendering, no
hook of dipreg's. For every context and source layer ℓ the whole neutral prompt runs through the model with a plain
forward hook that overwrites block ℓ's output at the last position with the context's ``h_ℓ``; the margin is read
from the model's own output logits (softcap included). ``tests/test_bench_peers.py`` holds the second reference,
nnterp's patchscope."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

import dipreg

#: The neutral prompt as docs/method.md defines it: Patchscopes' few-shot identity prompt, patched at the final "?".
NEUTRAL_PROMPT = "king king\n1135 1135\nhello hello\n?"

#: Where each architecture keeps its decoder blocks, written out here rather than asked of dipreg's adapter.
BLOCKS = {
    "llama": lambda model: model.model.layers,
    "gemma2": lambda model: model.model.layers,
    "gpt2": lambda model: model.transformer.h,
}


def block_output(output: torch.Tensor | tuple) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def context_residuals(model, blocks, ids: list[int]) -> list[torch.Tensor]:
    """``h_1..h_L`` at the last position: ``hidden_states[ℓ]`` for ℓ < L (block ℓ's output), and block L's own output
    caught by a hook (``hidden_states[L]`` is after the final norm)."""
    caught: list[torch.Tensor] = []
    handle = blocks[-1].register_forward_hook(lambda _m, _i, out: caught.append(block_output(out)[0, -1]))
    try:
        result = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    finally:
        handle.remove()
    return [h[0, -1] for h in result.hidden_states[1 : len(blocks)]] + caught


def patched_margin(model, blocks, neutral: list[int], layer: int, h: torch.Tensor, pos: int, neg: int) -> float:
    """The neutral prompt through the whole model, block ``layer``'s output at the last position replaced by ``h``."""

    def replace(_module, _inputs, output):
        hidden = block_output(output).clone()
        hidden[0, -1] = h
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = blocks[layer].register_forward_hook(replace)
    try:
        logits = model(input_ids=torch.tensor([neutral]), use_cache=False).logits[0, -1]
    finally:
        handle.remove()
    return float(logits[pos] - logits[neg])


@torch.no_grad()
def reference_causal_margins(model, blocks, tokenizer, context: str, pos: int, neg: int) -> torch.Tensor:
    """``(L,)`` patchscope margins of one raw-text context."""
    neutral = tokenizer(NEUTRAL_PROMPT)["input_ids"]
    residuals = context_residuals(model, blocks, tokenizer(context)["input_ids"])
    return torch.tensor([patched_margin(model, blocks, neutral, i, h, pos, neg) for i, h in enumerate(residuals)])


@pytest.mark.parametrize("arch", list(BLOCKS))
def test_causal_lens_equals_a_transplant_written_from_the_definition(arch, tiny_tokenizer, tiny_pairs):
    model = make_tiny_model(arch)
    blocks = BLOCKS[arch](model)
    traj = dipreg.trajectories(model, tiny_tokenizer, tiny_pairs, lens="causal", prompt="raw")
    for i, pair in enumerate(tiny_pairs):
        pos, neg = (tiny_tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in (pair.t_pos, pair.t_neg))
        for got, context in ((traj.margin_a[i], pair.ctx_a), (traj.margin_b[i], pair.ctx_b)):
            want = reference_causal_margins(model, blocks, tiny_tokenizer, context, pos, neg)
            assert want.abs().max() > 1e-2, "margins too close to zero for the comparison to mean anything"
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
