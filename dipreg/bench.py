"""`dipreg bench`: speed claims as ratios against references measured in the same run, on the same batches.

Each section times one part of dipreg next to its reference and returns named ratios; later parts add
sections to :data:`SECTIONS`. Nothing here asserts a time: the numbers are reported, with their targets.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor

from dipreg.adapter import ModelAdapter
from dipreg.artifacts import prepare_out_dir, write_json
from dipreg.kv_prefix import PrefixCache
from dipreg.models import load_model
from dipreg.stimuli import MinimalPair, candidate_token_ids, load_pairs
from dipreg.trajectory import ContextBatch, context_batches, shared_prefix_batches, trajectories


@dataclass
class BenchContext:
    """What every section shares: the model, its tokenizer, the pairs, the batches, and the settings."""

    model: Any
    tokenizer: Any
    pairs: list[MinimalPair]
    batch_size: int
    repeats: int
    naive_pairs: int = 32
    adapter: ModelAdapter = field(init=False)
    batches: list[ContextBatch] = field(init=False)
    prefix_ids: list[int] = field(init=False)
    suffix_batches: list[ContextBatch] = field(init=False)

    def __post_init__(self) -> None:
        self.adapter = ModelAdapter(self.model)
        self.batches = context_batches(self.tokenizer, self.pairs, self.batch_size, self.adapter)
        self.prefix_ids, self.suffix_batches = shared_prefix_batches(
            self.tokenizer, self.pairs, self.batch_size, self.adapter
        )

    def subset(self, count: int) -> BenchContext:
        """The same settings on the first ``count`` pairs (for references too slow to run on all of them)."""
        return BenchContext(self.model, self.tokenizer, self.pairs[:count], self.batch_size, self.repeats, count)


@dataclass(frozen=True)
class Ratio:
    """A reported ratio with its target (``<=`` or ``>=`` a bound); ``met`` is None for a ratio without one."""

    name: str
    value: float
    target: str
    met: bool | None
    detail: str


def time_median(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after one untimed warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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
            logits = adapter.lm_head(normed)  # (B, T, V): the full vocabulary at every position
            if adapter.softcap is not None:
                logits = torch.tanh(logits / adapter.softcap) * adapter.softcap
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


def lens_section(ctx: BenchContext) -> list[Ratio]:
    """Logit lens against the naive full-vocabulary lens (on ``ctx.naive_pairs`` pairs, both sides timed on the
    same pairs) and against a bare forward pass (on all pairs)."""

    def lens_on(c: BenchContext) -> Callable[[], object]:
        return lambda: trajectories(c.model, c.tokenizer, c.pairs, batch_size=c.batch_size)

    small = ctx.subset(ctx.naive_pairs)
    fast = lens_on(small)()
    naive = naive_full_vocab_margins(small)
    max_diff = max(float((fast.margin_a - naive[0::2]).abs().max()), float((fast.margin_b - naive[1::2]).abs().max()))
    t_lens_small = time_median(lens_on(small), ctx.repeats)
    t_naive = time_median(lambda: naive_full_vocab_margins(small), ctx.repeats)
    t_lens = time_median(lens_on(ctx), ctx.repeats)
    t_forward = time_median(lambda: bare_forward(ctx), ctx.repeats)
    speedup = t_naive / t_lens_small
    ratio = t_lens / t_forward
    return [
        Ratio(
            "lens_vs_naive_speedup",
            speedup,
            ">= 5",
            speedup >= 5,
            f"{len(small.pairs)} pairs: naive {t_naive:.3f}s / lens {t_lens_small:.3f}s; "
            f"max |margin diff| {max_diff:.2e}",
        ),
        Ratio(
            "lens_vs_forward_ratio",
            ratio,
            "<= 1.15",
            ratio <= 1.15,
            f"lens {t_lens:.3f}s / forward {t_forward:.3f}s",
        ),
    ]


def causal_section(ctx: BenchContext) -> list[Ratio]:
    """The causal lens against its naive transplant and against the logit lens (:mod:`dipreg.bench_causal`)."""
    from dipreg.bench_causal import causal_section as section

    return section(ctx)


def hinge_section(ctx: BenchContext) -> list[Ratio]:
    """Training-step overhead of the wrong-margin hinge (lives in :mod:`dipreg.bench_training`, imports Lightning)."""
    from dipreg.bench_training import hinge_overhead_section

    return hinge_overhead_section(ctx)


def section_name(section: Callable[[BenchContext], list[Ratio]]) -> str:
    """The CLI name of a section function: ``lens_section`` -> ``lens``."""
    return section.__name__.removesuffix("_section")


#: Sections of the core run by `dipreg bench`, in order (the CLI adds those of the subpackages).
SECTIONS: list[Callable[[BenchContext], list[Ratio]]] = [lens_section, causal_section, hinge_section]


def run_bench(
    model_name: str | None,
    pairs_name: str,
    out: str | Path,
    *,
    repeats: int = 3,
    batch_size: int = 16,
    naive_pairs: int = 32,
    sections: list[Callable[[BenchContext], list[Ratio]]] | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run ``sections`` (default :data:`SECTIONS`), print a table and write ``bench.json``; returns the payload."""
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}.")
    if naive_pairs < 1:
        raise ValueError(f"--naive-pairs must be >= 1, got {naive_pairs}.")
    console = console or Console()
    out_dir = prepare_out_dir(out)
    model, tokenizer = load_model(model_name)
    ctx = BenchContext(model, tokenizer, load_pairs(pairs_name), batch_size, repeats, naive_pairs)
    ratios: list[Ratio] = []
    with console.status("benchmarking…"):
        for section in SECTIONS if sections is None else sections:
            ratios.extend(section(ctx))
    table = Table(title=f"dipreg bench — {model_name or 'default:SmolLM2-135M-Instruct'}, {len(ctx.pairs)} pairs")
    for column in ("ratio", "value", "target", "met", "measured"):
        table.add_column(column)
    for r in ratios:
        table.add_row(r.name, f"{r.value:.3f}", r.target, "—" if r.met is None else "yes" if r.met else "NO", r.detail)
    console.print(table)
    payload: dict[str, Any] = {r.name: r.value for r in ratios}
    payload["details"] = {r.name: {"target": r.target, "met": r.met, "measured": r.detail} for r in ratios}
    payload.update(
        model=model_name or "default:SmolLM2-135M-Instruct",
        pairs=pairs_name,
        repeats=repeats,
        batch_size=batch_size,
        naive_pairs=naive_pairs,
        torch_threads=torch.get_num_threads(),
    )
    write_json(out_dir / "bench.json", payload)
    console.print(f"wrote {out_dir / 'bench.json'}")
    return payload
