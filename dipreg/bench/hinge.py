"""`dipreg bench` section `hinge_overhead`: a dip_reg training step against an output_only step, same batches.

Both arms wrap their own deep copy of the bench model (the bench's model is never changed) and run the same
training steps (forward, backward, AdamW step) over the same batches; the ratio is reported, never asserted.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

from dipreg.batching import pad_token_id
from dipreg.bench.core import BenchContext, Ratio
from dipreg.data import collate, pair_examples
from dipreg.losses import WrongMarginHinge
from dipreg.module import DipRegModule
from dipreg.prompting import PromptFormat

__all__ = ["hinge_overhead_section"]

#: Batches per timed run (a training step per batch).
BENCH_BATCHES = 2


def _step_runner(module: DipRegModule, batches: list) -> Callable[[], None]:
    optimizer = module.configure_optimizers()
    module.train()

    def run() -> None:
        for batch in batches:
            loss, _, _ = module.losses(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return run


def hinge_overhead_section(ctx: BenchContext) -> list[Ratio]:
    """``hinge_overhead`` = (dip_reg step time / output_only step time) − 1, target ≤ 0.10."""
    examples = pair_examples(ctx.tokenizer, ctx.pairs, PromptFormat("raw"))
    pad_id = pad_token_id(ctx.tokenizer)
    batches = [
        collate(examples[i : i + ctx.batch_size], pad_id)
        for i in range(0, min(len(examples), BENCH_BATCHES * ctx.batch_size), ctx.batch_size)
    ]
    runners = {
        arm: _step_runner(
            DipRegModule(model=copy.deepcopy(ctx.model), tokenizer=ctx.tokenizer, aux_losses=aux, dropout=0.0), batches
        )
        for arm, aux in (("output_only", []), ("dip_reg", [WrongMarginHinge(weight=0.2)]))
    }
    for run in runners.values():
        run()  # warm-up
    samples: dict[str, list[float]] = {arm: [] for arm in runners}
    for _ in range(ctx.repeats):  # alternate the arms so that load drifts on the machine hit both alike
        for arm, run in runners.items():
            start = time.perf_counter()
            run()
            samples[arm].append(time.perf_counter() - start)
    times = {arm: statistics.median(values) for arm, values in samples.items()}
    overhead = times["dip_reg"] / times["output_only"] - 1
    return [
        Ratio(
            "hinge_overhead",
            overhead,
            "<= 0.10",
            overhead <= 0.10,
            f"dip_reg {times['dip_reg']:.3f}s / output_only {times['output_only']:.3f}s "
            f"({len(batches)} training steps of {ctx.batch_size} raw contexts)",
        )
    ]
