"""`dipreg bench` section `monitor_overhead`: a fixed LoRA training run with DipMonitor over the same run without.

Registered by the CLI (the core never imports callbacks). Each run trains a deep copy of the bench model so that
PEFT's in-place adapter injection never reaches the model the other sections measure.

A probe costs about the same whatever the training step is, so the overhead is (probes × probe time) / (steps × step
time) and depends on the step size. The section times two step sizes: an SFT-sized step (8 × 256 tokens, still
small for supervised fine-tuning) carries the target, and a small step (4 × 48 tokens) shows how the ratio grows
when training steps are cheap. Besides the two wall times the issue defines the ratio by, it reports the time the
monitor itself spent inside the monitored run (its probes), which does not depend on run-to-run noise in step time.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader

from dipreg.bench.core import BenchContext, Ratio
from dipreg.callbacks.dip_monitor import DipMonitor
from dipreg.lenses import LENSES

#: The fixed run: optimizer steps, the monitor cadence and its probe-set size.
TRAIN_STEPS = 30
EVERY_N_STEPS = 15
PROBE_PAIRS = 32
#: Untimed steps before the timed fits (first-call allocations, kernel selection).
WARMUP_STEPS = 2
#: (batch size, sequence length) of the step that carries the ≤ 5 % target, and of the small informational one.
SFT_STEP = (8, 256)
SMALL_STEP = (4, 48)
TARGET = 0.05


class _LoRARun(pl.LightningModule):
    """A plain user-style LoRA fine-tune: next-token CE on fixed token batches."""

    def __init__(self, model: torch.nn.Module, tokenizer: object) -> None:
        super().__init__()
        self.net = get_peft_model(model, LoraConfig(r=16, target_modules=["q_proj", "v_proj"]))
        self.tokenizer = tokenizer

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.net(input_ids=batch, labels=batch, use_cache=False).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-4)


class _TimedMonitor(DipMonitor):
    """DipMonitor that adds up the wall time of its own probes."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.probe_seconds = 0.0
        self.probes = 0

    def _probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        start = time.perf_counter()
        super()._probe(trainer, pl_module)
        self.probe_seconds += time.perf_counter() - start
        self.probes += 1


def _timed_fit(ctx: BenchContext, steps: int, step_shape: tuple[int, int], monitor: DipMonitor | None) -> float:
    batch_size, seq_len = step_shape
    torch.manual_seed(0)
    vocab = ctx.adapter.lm_head.weight.shape[0]
    data = torch.randint(0, vocab, (steps * batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    module = _LoRARun(copy.deepcopy(ctx.adapter.causal_lm), ctx.tokenizer)
    scratch = tempfile.TemporaryDirectory(prefix="dipreg-bench-")  # the monitor's history JSON lands here
    trainer = pl.Trainer(
        default_root_dir=scratch.name,
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor] if monitor else [],
    )
    start = time.perf_counter()
    trainer.fit(module, DataLoader(list(data), batch_size=batch_size))
    elapsed = time.perf_counter() - start
    scratch.cleanup()
    return elapsed


@dataclass(frozen=True)
class OverheadRun:
    """Wall times of the fixed fit with and without the monitor, and the monitor's own probe time."""

    step_shape: tuple[int, int]
    bare_s: float
    monitored_s: float
    probe_s: float
    probes: int

    @property
    def overhead(self) -> float:
        """Fit time with the monitor ÷ fit time without − 1 (the issue's definition)."""
        return self.monitored_s / self.bare_s - 1

    @property
    def probe_share(self) -> float:
        """Probe time ÷ the rest of the monitored fit: the same ratio without comparing two runs."""
        return self.probe_s / (self.monitored_s - self.probe_s)

    def describe(self, lenses: tuple[str, ...], pairs: int) -> str:
        """One line with both wall times, the per-probe and per-step costs, and the in-run probe share."""
        batch, seq = self.step_shape
        return (
            f"{TRAIN_STEPS} LoRA steps (batch {batch}×{seq}): {self.monitored_s:.1f}s with monitor "
            f"({'+'.join(lenses)}, {pairs} pairs, every {EVERY_N_STEPS} steps + step 0) vs {self.bare_s:.1f}s "
            f"without; {self.probes} probes took {self.probe_s:.1f}s in the run ({self.probe_s / self.probes:.2f}s "
            f"each, {self.probe_share:.3f} of the rest of the fit) vs {self.bare_s / TRAIN_STEPS:.2f}s per step"
        )


def measure_overhead(
    ctx: BenchContext, step_shape: tuple[int, int], probe: list, lenses: tuple[str, ...]
) -> OverheadRun:
    """A short untimed warm-up fit, then the bare fit, then the monitored fit (all on fresh copies)."""
    _timed_fit(ctx, WARMUP_STEPS, step_shape, None)
    bare = _timed_fit(ctx, TRAIN_STEPS, step_shape, None)
    monitor = _TimedMonitor(probe, every_n_steps=EVERY_N_STEPS, lenses=lenses, log_figures=False)
    monitored = _timed_fit(ctx, TRAIN_STEPS, step_shape, monitor)
    return OverheadRun(step_shape, bare, monitored, monitor.probe_seconds, monitor.probes)


def monitor_section(ctx: BenchContext) -> list[Ratio]:
    """``monitor_overhead`` = fit time with DipMonitor(every_n_steps=15) / fit time without − 1, on an SFT-sized
    step (target ≤ 0.05), and ``monitor_overhead_small_step`` on a small step (no target: it shows the scaling)."""
    lenses = ("logit", "causal") if "causal" in LENSES else ("logit",)
    probe = ctx.pairs[:PROBE_PAIRS]
    sft = measure_overhead(ctx, SFT_STEP, probe, lenses)
    small = measure_overhead(ctx, SMALL_STEP, probe, lenses)
    return [
        Ratio(
            "monitor_overhead",
            sft.overhead,
            f"<= {TARGET}",
            sft.overhead <= TARGET,
            sft.describe(lenses, len(probe)),
        ),
        Ratio("monitor_overhead_small_step", small.overhead, "— (scaling)", None, small.describe(lenses, len(probe))),
    ]
