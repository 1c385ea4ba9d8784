"""`dipreg bench` section for the causal lens: cached batched transplant vs the naive transplant, and vs the logit lens.

Reports ratios only; asserts nothing about time.
"""

from __future__ import annotations

import time

import torch

from dipreg.batching import context_batches
from dipreg.bench.core import BenchContext, Ratio, time_median, time_once
from dipreg.lenses.causal import CausalLens, naive_causal_margins
from dipreg.stimuli import candidate_token_ids

#: The naive reference is run on as many contexts as fit in about this many seconds (at least two).
NAIVE_BUDGET_S = 60.0


@torch.no_grad()
def _subset_residuals(ctx: BenchContext, num_pairs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Answer-position residuals ``(L, 2n, D)`` and candidate ids of the first ``num_pairs`` pairs (interleaved)."""
    pairs = ctx.pairs[:num_pairs]
    adapter = ctx.adapter
    residuals = torch.empty(adapter.num_layers, 2 * len(pairs), adapter.lm_head.weight.shape[-1])
    for batch in context_batches(ctx.tokenizer, pairs, ctx.batch_size, adapter):
        residuals[:, batch.rows] = adapter.residuals(batch.input_ids, batch.attention_mask, batch.last).cpu()
    pos, neg = candidate_token_ids(pairs, ctx.tokenizer)
    return residuals, torch.tensor(pos).repeat_interleave(2), torch.tensor(neg).repeat_interleave(2)


def causal_section(ctx: BenchContext) -> list[Ratio]:
    """``causal_vs_naive_speedup`` on a subset of contexts sized to the naive budget (the same contexts for both),
    and ``causal_vs_lens_ratio``: causal-lens trajectories over logit-lens trajectories on the whole pair set."""
    adapter = ctx.adapter
    one, pos1, neg1 = _subset_residuals(ctx, 1)
    neutral_ids = CausalLens(adapter, ctx.tokenizer).neutral_ids
    start = time.perf_counter()
    naive_causal_margins(adapter, neutral_ids, one, pos1, neg1)  # also the warm-up
    per_context = (time.perf_counter() - start) / 2
    num_pairs = min(len(ctx.pairs), max(1, int(NAIVE_BUDGET_S / per_context) // 2))
    residuals, pos, neg = _subset_residuals(ctx, num_pairs)

    def fast() -> torch.Tensor:
        return CausalLens(adapter, ctx.tokenizer).margins(adapter, residuals, pos, neg)

    fast_margins = fast()  # the correctness side, also the warm-up of its timing
    t_fast = time_median(fast, ctx.repeats, warmup=lambda: None)
    # One run: the naive path is the slow one being measured (its per-context probe above was its warm-up).
    t_naive, naive = time_once(lambda: naive_causal_margins(adapter, neutral_ids, residuals, pos, neg))
    max_diff = float((fast_margins - naive).abs().max())
    speedup = t_naive / t_fast

    # The whole-set causal lens warms up on the naive subset; the logit lens's time is shared with the lens section.
    small = ctx.naive_subset
    t_causal = time_median(lambda: ctx.trajectories("causal"), ctx.repeats, lambda: small.trajectories("causal"))
    t_logit = ctx.logit_lens_seconds()
    ratio = t_causal / t_logit
    subset = f"{2 * num_pairs} of {2 * len(ctx.pairs)} contexts ({num_pairs} pairs)"
    if num_pairs < len(ctx.pairs):
        subset += f", a subset: the naive path would take over {NAIVE_BUDGET_S:.0f} s on all"
    return [
        Ratio(
            "causal_vs_naive_speedup",
            speedup,
            ">= 10",
            speedup >= 10,
            f"naive {t_naive:.3f}s (1 run) / causal {t_fast:.3f}s on {subset}, all {adapter.num_layers} layers; "
            f"max |margin diff| {max_diff:.2e}",
        ),
        Ratio(
            "causal_vs_lens_ratio",
            ratio,
            "<= 2",
            ratio <= 2,
            f"causal-lens trajectories {t_causal:.3f}s / logit-lens trajectories {t_logit:.3f}s",
        ),
    ]
