"""`dipreg bench` section `monitor_overhead`: a fixed LoRA training run with DipMonitor over the same run without.

Registered by the CLI (the core never imports callbacks). The run trains a deep copy of the bench model so that
PEFT's in-place adapter injection never reaches the model the other sections measure.
"""

from __future__ import annotations

import copy
import tempfile
import time

import lightning.pytorch as pl
import torch
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader

from dipreg.bench import BenchContext, Ratio
from dipreg.callbacks.dip_monitor import DipMonitor
from dipreg.lenses import LENSES

#: The fixed run: optimizer steps, batch size, sequence length, the monitor cadence and its probe-set size.
TRAIN_STEPS = 30
BATCH_SIZE = 4
SEQ_LEN = 48
EVERY_N_STEPS = 15
PROBE_PAIRS = 32


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


def _timed_fit(ctx: BenchContext, monitor: DipMonitor | None) -> float:
    torch.manual_seed(0)
    vocab = ctx.adapter.lm_head.weight.shape[0]
    data = torch.randint(0, vocab, (TRAIN_STEPS * BATCH_SIZE, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    module = _LoRARun(copy.deepcopy(ctx.adapter.causal_lm), ctx.tokenizer)
    scratch = tempfile.TemporaryDirectory(prefix="dipreg-bench-")  # the monitor's history JSON lands here
    trainer = pl.Trainer(
        default_root_dir=scratch.name,
        max_steps=TRAIN_STEPS,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor] if monitor else [],
    )
    start = time.perf_counter()
    trainer.fit(module, DataLoader(list(data), batch_size=BATCH_SIZE))
    elapsed = time.perf_counter() - start
    scratch.cleanup()
    return elapsed


def monitor_section(ctx: BenchContext) -> list[Ratio]:
    """``monitor_overhead`` = fit time with DipMonitor(every_n_steps=15) / fit time without − 1."""
    lenses = ("logit", "causal") if "causal" in LENSES else ("logit",)
    probe = ctx.pairs[:PROBE_PAIRS]
    bare = _timed_fit(ctx, None)
    monitored = _timed_fit(ctx, DipMonitor(probe, every_n_steps=EVERY_N_STEPS, lenses=lenses, log_figures=False))
    overhead = monitored / bare - 1
    probes = TRAIN_STEPS // EVERY_N_STEPS + 1
    # The overhead is (probes × probe time) / (steps × step time): printing both sides shows how it scales with a
    # larger training step than this fixed one.
    detail = (
        f"{TRAIN_STEPS} LoRA steps (batch {BATCH_SIZE}×{SEQ_LEN}): {monitored:.1f}s with monitor "
        f"({'+'.join(lenses)}, {len(probe)} pairs, every {EVERY_N_STEPS} steps + step 0) vs {bare:.1f}s without; "
        f"≈{(monitored - bare) / probes:.2f}s per probe vs {bare / TRAIN_STEPS:.2f}s per step"
    )
    return [Ratio("monitor_overhead", overhead, "<= 0.05", overhead <= 0.05, detail)]
