"""What every `dipreg bench` section shares: the context (model, pairs, batches, settings), the reported ratio, and
the median timer. Sections live one per module beside this one; none of them asserts a time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dipreg.adapter import ModelAdapter
from dipreg.batching import ContextBatch, context_batches, shared_prefix_batches
from dipreg.stimuli import MinimalPair


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
    #: Times measured once and shared by the sections that need them (e.g. the whole-set logit lens, which the
    #: ``lens`` and ``causal`` sections both divide by), so that a default run times each of them once.
    shared_seconds: dict[str, float] = field(init=False, default_factory=dict)

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


def time_median(fn: Callable[[], object], repeats: int, warmup: Callable[[], object] | None = None) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after one untimed warm-up run: of ``warmup`` when given
    (a cheaper call through the same code, e.g. the same function on a few pairs), else of ``fn`` itself."""
    (warmup or fn)()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def shared_time_median(ctx: BenchContext, key: str, fn: Callable[[], object], warmup: Callable[[], object]) -> float:
    """:func:`time_median` of ``fn``, measured once per context under ``key`` and reused by later sections."""
    if key not in ctx.shared_seconds:
        ctx.shared_seconds[key] = time_median(fn, ctx.repeats, warmup)
    return ctx.shared_seconds[key]


#: A bench section: a function of the shared context that returns its ratios.
Section = Callable[[BenchContext], list[Ratio]]
