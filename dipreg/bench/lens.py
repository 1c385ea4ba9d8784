"""`dipreg bench` section `lens`: the two-row logit lens against the naive full-vocabulary lens and a bare forward.

Reports ratios only; asserts nothing about time.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from dipreg.bench.core import BenchContext, Ratio, time_median, time_once
from dipreg.kv_prefix import PrefixCache
from dipreg.stimuli import candidate_token_ids
from dipreg.trajectory import trajectories


@torch.no_grad()
def naive_full_vocab_margins(ctx: BenchContext) -> Tensor:
    """The naive logit lens: ``output_hidden_states``, full-vocabulary logits at every position of every
    layer, then pick two tokens. Returns ``(2N, L)`` margins in interleaved context order."""
    pos, neg = candidate_token_ids(ctx.pairs, ctx.tokenizer)
    pos_ids = torch.tensor(pos).repeat_interleave(2)
    neg_ids = torch.tensor(neg).repeat_interleave(2)
    adapter = ctx.adapter
    out = torch.empty(2 * len(ctx.pairs), adapter.num_layers)
    for batch in ctx.batches:
        hidden = adapter.causal_lm(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True
        ).hidden_states
        rows = torch.arange(batch.input_ids.shape[0])
        for layer in range(1, adapter.num_layers + 1):
            # HF returns the last entry already after the final norm; the earlier ones are raw residuals.
            normed = hidden[layer] if layer == adapter.num_layers else adapter.final_norm(hidden[layer])
            logits = adapter.vocab_logits(normed)  # (B, T, V): the full vocabulary at every position
            last = logits[rows, batch.last]
            idx = batch.rows
            out[idx, layer - 1] = last[rows, pos_ids[idx]] - last[rows, neg_ids[idx]]
    return out


@torch.no_grad()
def bare_forward(ctx: BenchContext) -> None:
    """The reference forward: the backbone over the same batches as the lens, no hooks, no head. Like the lens it
    runs the prefix every context shares once and the rest of each context after it."""
    prefix = PrefixCache(ctx.adapter, ctx.prefix_ids) if ctx.prefix_ids else None
    for batch in ctx.suffix_batches:
        ctx.adapter.run_backbone(batch.input_ids, batch.attention_mask, prefix)


def bf16_vs_fp32(ctx: BenchContext) -> Ratio:
    """``lens_bf16_vs_fp32_maxdiff``: the largest |logit-lens margin difference| between the model run in bfloat16
    and in float32 (same weights; a copy in the other dtype), over every layer of ``ctx.naive_pairs`` pairs. It
    measures what bfloat16 does to the model's residuals (the lens itself computes in float32 either way); the
    detail gives it relative to the largest float32 margin and the share of items whose output sign agrees."""
    small = ctx.naive_subset
    dtype = next(p.dtype for p in ctx.model.parameters() if p.is_floating_point())
    other = copy.deepcopy(ctx.model).to(torch.float32 if dtype == torch.bfloat16 else torch.bfloat16)
    models = {dtype: ctx.model, other.dtype: other}
    runs = {d: trajectories(m, ctx.tokenizer, small.pairs, batch_size=ctx.batch_size) for d, m in models.items()}
    fp32, bf16 = runs[torch.float32], runs[torch.bfloat16]
    diff = max(float((bf16.margin_a - fp32.margin_a).abs().max()), float((bf16.margin_b - fp32.margin_b).abs().max()))
    scale = max(float(fp32.margin_a.abs().max()), float(fp32.margin_b.abs().max()))
    agree = float(((bf16.did[:, -1] > 0) == (fp32.did[:, -1] > 0)).float().mean())
    return Ratio(
        "lens_bf16_vs_fp32_maxdiff",
        diff,
        "— (precision)",
        None,
        f"{len(small.pairs)} pairs, all layers: max |bf16 − fp32 margin| {diff:.3g} = {diff / scale:.2%} of the "
        f"largest fp32 margin; output sign (DiD(L)) agrees on {agree:.1%} of items",
    )


def lens_section(ctx: BenchContext) -> list[Ratio]:
    """Logit lens against the naive full-vocabulary lens (on ``ctx.naive_pairs`` pairs, both sides timed on the
    same pairs) and against a bare forward pass (on all pairs); and the bfloat16-vs-float32 margin difference
    (:func:`bf16_vs_fp32`)."""

    small = ctx.naive_subset
    fast = small.trajectories()  # the correctness check, also the warm-up of the lens's timing on these pairs
    naive = naive_full_vocab_margins(small)  # the correctness check, also the naive path's warm-up
    max_diff = max(float((fast.margin_a - naive[0::2]).abs().max()), float((fast.margin_b - naive[1::2]).abs().max()))
    t_lens_small = time_median(small.trajectories, ctx.repeats, warmup=lambda: None)
    t_naive, _ = time_once(lambda: naive_full_vocab_margins(small))  # the naive path is the slow one being measured
    t_lens = ctx.logit_lens_seconds()
    t_forward = time_median(lambda: bare_forward(ctx), ctx.repeats, lambda: bare_forward(small))
    speedup = t_naive / t_lens_small
    ratio = t_lens / t_forward
    return [
        Ratio(
            "lens_vs_naive_speedup",
            speedup,
            ">= 5",
            speedup >= 5,
            f"{len(small.pairs)} pairs: naive {t_naive:.3f}s (1 run) / lens {t_lens_small:.3f}s; "
            f"max |margin diff| {max_diff:.2e}",
        ),
        Ratio(
            "lens_vs_forward_ratio",
            ratio,
            "<= 1.15",
            ratio <= 1.15,
            f"lens {t_lens:.3f}s / forward {t_forward:.3f}s",
        ),
        bf16_vs_fp32(ctx),
    ]
