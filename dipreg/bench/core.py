"""What every `dipreg bench` section shares: the context (model, pairs, batches, settings), the reported ratio, and
the median timer. Sections live one per module beside this one; none of them asserts a time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, TypeVar

from dipreg.adapter import ModelAdapter
from dipreg.batching import ContextBatch, context_batches, shared_prefix_batches
from dipreg.stimuli import MinimalPair
from dipreg.trajectory import Trajectories, trajectories

T = TypeVar("T")


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
    _logit_lens_seconds: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.adapter = ModelAdapter(self.model)
        self.batches = context_batches(self.tokenizer, self.pairs, self.batch_size, self.adapter)
        self.prefix_ids, self.suffix_batches = shared_prefix_batches(
            self.tokenizer, self.pairs, self.batch_size, self.adapter
        )

    def subset(self, count: int) -> BenchContext:
        """The same settings on the first ``count`` pairs (for references too slow to run on all of them)."""
        return BenchContext(self.model, self.tokenizer, self.pairs[:count], self.batch_size, self.repeats, count)

    @cached_property
    def naive_subset(self) -> BenchContext:
        """The first ``naive_pairs`` pairs: where the slow references run and the whole-set timings warm up (the
        same code and batch shapes as the whole set, a fraction of its time)."""
        return self.subset(self.naive_pairs)

    def trajectories(self, lens: str = "logit") -> Trajectories:
        """``dipreg.trajectories`` of this context's model on its pairs with ``lens``, at its batch size."""
        return trajectories(self.model, self.tokenizer, self.pairs, lens=lens, batch_size=self.batch_size)

    def logit_lens_seconds(self) -> float:
        """Median time of whole-set logit-lens trajectories, warmed up on :attr:`naive_subset`; measured on first
        use and shared by every section that divides by it (``lens`` and ``causal``), so a bench times it once."""
        if self._logit_lens_seconds is None:
            self._logit_lens_seconds = time_median(self.trajectories, self.repeats, self.naive_subset.trajectories)
        return self._logit_lens_seconds


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


def time_once(fn: Callable[[], T]) -> tuple[float, T]:
    """Wall time of one run of ``fn`` and its result: for a slow naive reference, the side of a ratio that is timed
    once (after its own warm-up run elsewhere) rather than ``repeats`` times."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


#: A bench section: a function of the shared context that returns its ratios.
Section = Callable[[BenchContext], list[Ratio]]
