"""`dipreg bench` section `monitor`: what DipMonitor costs a LoRA fine-tune.

Registered by the CLI (the core never imports callbacks). Each run trains a deep copy of the bench model so that
PEFT's in-place adapter injection never reaches the model the other sections measure.

A probe costs about the same whatever the training step is, so the cost is (probes × probe time) / (steps × step
time) and depends on the step size. The headline, ``monitor_probe_share``, is measured inside ONE monitored fit with
an SFT-sized step (8 × 256 tokens): the wall time of the monitor's probes ÷ the wall time of the rest of that fit.
It does not compare two fits, so run-to-run noise in step time does not enter it. Two secondary lines keep the
older definition, the wall time of the monitored fit ÷ that of the same fit without the monitor − 1
(``monitor_overhead``, noisy: two fits), and the same on a small step (4 × 48 tokens), which shows how the cost
grows when training steps are cheap.
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
#: (batch size, sequence length) of the step that carries the ≤ 5 % probe-share target, and of the small one.
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
    def rest_s(self) -> float:
        """The monitored fit's wall time outside the monitor's probes."""
        return self.monitored_s - self.probe_s

    @property
    def probe_share(self) -> float:
        """Probe time ÷ the rest of the monitored fit: the monitor's cost measured in one run."""
        return self.probe_s / self.rest_s

    def describe_share(self, lenses: tuple[str, ...], pairs: int) -> str:
        """One line with the probe and rest times the share divides, per probe and per step, and the steady-state
        share (one probe per ``EVERY_N_STEPS`` steps, i.e. without the probe before the first step)."""
        batch, seq = self.step_shape
        per_probe, per_step = self.probe_s / self.probes, self.rest_s / TRAIN_STEPS
        return (
            f"in one {TRAIN_STEPS}-step LoRA fit (batch {batch}×{seq}) with DipMonitor ({'+'.join(lenses)}, {pairs} "
            f"pairs, every {EVERY_N_STEPS} steps + step 0): {self.probes} probes {self.probe_s:.3f}s / rest of the "
            f"fit {self.rest_s:.3f}s; {per_probe:.2f}s per probe vs {per_step:.2f}s per step, steady state (one "
            f"probe per {EVERY_N_STEPS} steps) {per_probe / (EVERY_N_STEPS * per_step):.3f}"
        )

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
    """``monitor_probe_share`` (the headline, target ≤ 0.05): probe time ÷ the rest of one monitored fit with
    DipMonitor(every_n_steps=15) on an SFT-sized step; ``monitor_overhead``: monitored ÷ bare fit wall time − 1 on
    the same step, and ``monitor_overhead_small_step`` on a small step (no targets: secondary)."""
    lenses = ("logit", "causal") if "causal" in LENSES else ("logit",)
    probe = ctx.pairs[:PROBE_PAIRS]
    sft = measure_overhead(ctx, SFT_STEP, probe, lenses)
    small = measure_overhead(ctx, SMALL_STEP, probe, lenses)
    share = sft.probe_share
    return [
        Ratio("monitor_probe_share", share, f"<= {TARGET}", share <= TARGET, sft.describe_share(lenses, len(probe))),
        Ratio("monitor_overhead", sft.overhead, "— (two fits)", None, sft.describe(lenses, len(probe))),
        Ratio("monitor_overhead_small_step", small.overhead, "— (scaling)", None, small.describe(lenses, len(probe))),
    ]
