"""`dipreg bench` section `hinge`: training steps with each hinge against an output_only step, same batches.

``hinge_overhead`` (the logit-lens hinge, dip_reg), ``hinge_causal_overhead`` (the causal hinge,
:class:`~dipreg.losses.CausalMarginHinge`, at its defaults) and ``hinge_tuned_overhead``
(:class:`~dipreg.losses.TunedMarginHinge` with an identity-initialised tuned lens: a trained one costs the
same). Every arm wraps its own deep copy of the bench model (the bench's model is never changed) and runs the same
training steps (forward, backward, AdamW step) over the same batches; the ratios are reported, never asserted.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

from dipreg.adapter import ModelAdapter
from dipreg.batching import pad_token_id
from dipreg.bench.core import BenchContext, Ratio
from dipreg.lenses.tuned import TunedLens
from dipreg.losses import CausalMarginHinge, TunedMarginHinge, WrongMarginHinge
from dipreg.prompting import PromptFormat
from dipreg.training.data import collate, pair_examples
from dipreg.training.module import DipRegModule

__all__ = ["hinge_overhead_section"]

#: Batches per timed run (a training step per batch).
BENCH_BATCHES = 2
#: name -> (target bound on the overhead, the arm it times).
TARGETS: dict[str, tuple[float, str]] = {
    "hinge_overhead": (0.10, "dip_reg"),
    "hinge_causal_overhead": (1.0, "dip_reg_causal"),
    "hinge_tuned_overhead": (0.25, "dip_reg_tuned"),
}


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


def _tuned_hinge(ctx: BenchContext) -> TunedMarginHinge:
    """A tuned hinge whose lens is identity-initialised (no trained lens needed; the cost is the same)."""
    adapter = ModelAdapter(ctx.model)
    hinge = TunedMarginHinge(weight=0.2)
    lens = TunedLens(adapter.num_layers, int(adapter.lm_head.weight.shape[-1])).to(adapter.device)
    hinge.lens = lens.requires_grad_(False).eval()
    return hinge


def hinge_overhead_section(ctx: BenchContext) -> list[Ratio]:
    """Per hinge: (hinge step time / output_only step time) − 1. Targets: ``hinge_overhead`` ≤ 0.10 (logit lens),
    ``hinge_causal_overhead`` ≤ 1.0 (causal hinge at its defaults), ``hinge_tuned_overhead`` ≤ 0.25."""
    examples = pair_examples(ctx.tokenizer, ctx.pairs, PromptFormat("raw"))
    pad_id = pad_token_id(ctx.tokenizer)
    batches = [
        collate(examples[i : i + ctx.batch_size], pad_id)
        for i in range(0, min(len(examples), BENCH_BATCHES * ctx.batch_size), ctx.batch_size)
    ]
    arms = (
        ("output_only", []),
        ("dip_reg", [WrongMarginHinge(weight=0.2)]),
        ("dip_reg_causal", [CausalMarginHinge(weight=0.2, seed=0, tokenizer=ctx.tokenizer)]),
        ("dip_reg_tuned", [_tuned_hinge(ctx)]),
    )
    runners = {
        arm: _step_runner(
            DipRegModule(model=copy.deepcopy(ctx.model), tokenizer=ctx.tokenizer, aux_losses=aux, dropout=0.0), batches
        )
        for arm, aux in arms
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
    ratios = []
    for name, (bound, arm) in TARGETS.items():
        overhead = times[arm] / times["output_only"] - 1
        ratios.append(
            Ratio(
                name,
                overhead,
                f"<= {bound:.2f}",
                overhead <= bound,
                f"{arm} {times[arm]:.3f}s / output_only {times['output_only']:.3f}s "
                f"({len(batches)} training steps of {ctx.batch_size} raw contexts)",
            )
        )
    return ratios
