"""Part (b): time the audit, the causal lens, a DipMonitor probe and LoRA steps on random-weight models in bfloat16,
each as a ratio against a bare forward or a bare training step measured in the same run.

Sizes: ``real`` = the shipped Qwen2.5-1.5B and Qwen2.5-7B configs (``dipreg/configs``); ``tiny`` = a 4-layer Qwen2
of width 64 (seconds on a CPU). The word-level tokenizer makes contexts shorter than a BPE tokenizer would (about
20 tokens instead of 30), raw prompts (no chat template): absolute times are lower bounds, ratios are the claim.
"""

from __future__ import annotations

import copy
import gc
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from dipreg.bench.core import BenchContext, time_median
from dipreg.bench.lens import bare_forward
from dipreg.memory import shipped_config
from dipreg.selftest.build import random_model, tiny_config, word_tokenizer
from dipreg.stimuli import load_pairs
from dipreg.trajectory import trajectories

#: Size name -> the configs timed.
SIZE_MODELS = {"real": ["Qwen2.5-1.5B", "Qwen2.5-7B"], "tiny": ["tiny-qwen2"]}
BATCH_SIZE = 16
WARMUP_STEPS = 2


@dataclass(frozen=True)
class Plan:
    """How much each size runs: audited pairs, LoRA steps, monitor cadence and probe pairs, timing repeats."""

    pairs: int
    lora_steps: int
    monitor_every: int
    probe_pairs: int
    repeats: int


#: ``real``: the issue's measurement (278 pairs, 20 steps, a probe of 32 pairs every 10 steps); ``tiny``: the same
#: code on a CPU in seconds.
PLANS = {"real": Plan(278, 20, 10, 32, 3), "tiny": Plan(24, 4, 2, 4, 1)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Any, device: torch.device, repeats: int) -> float:
    def run() -> None:
        fn()
        _sync(device)

    return time_median(run, repeats)


def _fit_seconds(
    model: Any, tokenizer: Any, device: torch.device, plan: Plan, *, steps: int, monitor: bool, hinge: bool
) -> dict:
    """Wall time of ``steps`` LoRA steps (DipRegModule, bf16-true) on a fresh copy of ``model``; with the monitor,
    also its probes' own time."""
    import lightning as L

    from dipreg.bench.monitor import _TimedMonitor
    from dipreg.losses import WrongMarginHinge
    from dipreg.training.data import PairDataModule
    from dipreg.training.module import DipRegModule

    aux = [WrongMarginHinge(weight=0.2)] if hinge else []
    module = DipRegModule(model=copy.deepcopy(model), tokenizer=tokenizer, aux_losses=aux, dropout=0.0)
    probe = load_pairs("core")[: plan.probe_pairs]
    callbacks = [_TimedMonitor(probe, every_n_steps=plan.monitor_every, lenses=("logit", "causal"), log_figures=False)]
    with tempfile.TemporaryDirectory(prefix="dipreg-selftest-") as root:
        trainer = L.Trainer(
            max_steps=steps,
            accelerator="gpu" if device.type == "cuda" else "cpu",
            devices=[device.index or 0] if device.type == "cuda" else 1,
            precision="bf16-true",
            default_root_dir=root,
            limit_val_batches=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=callbacks if monitor else [],
        )
        data = PairDataModule(train="core", val=[], batch_size=BATCH_SIZE, prompt="raw", tokenizer=tokenizer)
        data.train_pairs = data.train_pairs[: plan.pairs]
        start = time.perf_counter()
        trainer.fit(module, data)
        _sync(device)
        seconds = time.perf_counter() - start
    result = {"seconds": seconds, "steps": trainer.global_step}
    if monitor:
        result.update(probe_seconds=callbacks[0].probe_seconds, probes=callbacks[0].probes)
    del module, trainer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def time_size(name: str, device: torch.device, plan: Plan) -> dict[str, Any]:
    """Every timing and ratio of one model size on ``device`` in bfloat16."""
    tokenizer = word_tokenizer(load_pairs("core"))
    pairs = load_pairs("core")[: plan.pairs]
    repeats, steps = plan.repeats, plan.lora_steps
    config = tiny_config("qwen2", len(tokenizer)) if name.startswith("tiny") else shipped_config(name)
    if name.startswith("tiny"):
        config.hidden_size, config.intermediate_size, config.num_hidden_layers = 64, 128, 4
    start = time.perf_counter()
    model = random_model(config, dtype=torch.bfloat16, device=str(device), draw_on_device=True)
    built = time.perf_counter() - start
    ctx = BenchContext(model, tokenizer, pairs, BATCH_SIZE, repeats)
    forward = _timed(lambda: bare_forward(ctx), device, repeats)
    audit = _timed(lambda: trajectories(model, tokenizer, pairs, batch_size=BATCH_SIZE, prompt="raw"), device, repeats)
    causal = _timed(
        lambda: trajectories(model, tokenizer, pairs, lens="causal", batch_size=BATCH_SIZE, prompt="raw"), device, 1
    )
    _fit_seconds(model, tokenizer, device, plan, steps=WARMUP_STEPS, monitor=False, hinge=False)  # warm-up
    fits = {
        f"{'monitor' if m else 'bare'}{'+hinge' if h else ''}": _fit_seconds(
            model, tokenizer, device, plan, steps=steps, monitor=m, hinge=h
        )
        for m in (False, True)
        for h in (False, True)
    }
    bare_step = fits["bare"]["seconds"] / steps
    probe = fits["monitor"]["probe_seconds"] / max(1, fits["monitor"]["probes"])
    params = sum(p.numel() for p in model.parameters())
    return {
        "parameters": params,
        "build_seconds": built,
        "seconds": {
            "bare_forward": forward,
            "logit_audit": audit,
            "causal_lens": causal,
            "monitor_probe": probe,
            **{f"lora_steps_{k}": v["seconds"] for k, v in fits.items()},
        },
        "ratios": {
            "audit_vs_forward": audit / forward,
            "causal_vs_forward": causal / forward,
            "probe_vs_forward": probe / forward,
            "probe_vs_bare_step": probe / bare_step,
            "steps_monitor_vs_bare": fits["monitor"]["seconds"] / fits["bare"]["seconds"],
            "steps_hinge_vs_bare": fits["bare+hinge"]["seconds"] / fits["bare"]["seconds"],
            "steps_monitor_hinge_vs_bare": fits["monitor+hinge"]["seconds"] / fits["bare"]["seconds"],
        },
        "settings": {
            **asdict(plan),
            "batch_size": BATCH_SIZE,
            "probes": fits["monitor"]["probes"],
            "precision": "bf16-true",
            "dtype": "bfloat16",
        },
    }
