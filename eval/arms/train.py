"""Train one arm × seed of `dipreg arms`: the recipe's LoRA SFT with DipMonitor on and CompressionRetention at the end.

Everything a later stage needs lands in the run folder: ``tb/adapter/`` (PEFT ``save_pretrained``),
``tb/dip_history.json`` (the DipMonitor history), ``retention.json`` (CompressionRetention at the last step), the
TensorBoard events, and ``train.json``, written last, which marks the run as finished (resume skips it).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

from dipreg.artifacts import write_json
from dipreg.callbacks.compression_retention import CompressionRetention
from dipreg.callbacks.dip_monitor import DipMonitor
from dipreg.data import PairDataModule
from dipreg.eval.arms.plan import ArmSpec, ArmsSettings, instantiate_losses
from dipreg.module import DipRegModule
from dipreg.stimuli import load_pairs

__all__ = ["TRAIN_DONE", "limited_pairs", "train_arm"]

#: The file that marks a finished training run.
TRAIN_DONE = "train.json"


def limited_pairs(name: str, limit: int | None) -> list:
    """The first ``limit`` pairs of set ``name`` (all when ``limit`` is ``None``)."""
    pairs = load_pairs(name)
    return pairs if limit is None else pairs[:limit]


def train_arm(
    arm: ArmSpec, seed: int, settings: ArmsSettings, run_dir: Path, *, model_name: str | None = None
) -> dict[str, Any]:
    """Train ``arm`` with ``seed`` into ``run_dir`` and return the contents of ``train.json``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config = arm.recipe_config()
    pl.seed_everything(seed, verbose=False)
    model_cfg = dict(config["model"])
    aux = instantiate_losses(model_cfg.pop("aux_losses", []))
    model_cfg["model_name"] = model_name
    module = DipRegModule(**model_cfg, aux_losses=aux)
    data_cfg = dict(config["data"])
    data = PairDataModule(
        train=data_cfg["train"],
        val=data_cfg.get("val"),
        batch_size=settings.batch_size or data_cfg["batch_size"],
        prompt=settings.prompt,
    )
    monitor = DipMonitor(
        limited_pairs(settings.monitor_pairs, settings.monitor_limit),
        every_n_steps=settings.monitor_every,
        lenses=("logit", "causal"),
        prompt=settings.prompt,
        batch_size=settings.batch_eval,
        history_file="dip_history.json",
    )
    retention = CompressionRetention(
        limited_pairs(settings.retention_pairs, settings.retention_limit),
        settings.retention_ops,
        on="checkpoint",
        prompt=settings.prompt,
        batch_size=settings.batch_eval,
    )
    max_steps = settings.max_steps or config["trainer"]["max_steps"]
    trainer = pl.Trainer(
        max_steps=max_steps,
        logger=TensorBoardLogger(str(run_dir), name="tb", version=""),
        callbacks=[monitor, retention],
        enable_checkpointing=False,  # the one checkpoint is written below, which also triggers the retention eval
        enable_progress_bar=False,  # the arms runner shows one progress bar for the whole run
        enable_model_summary=False,
        limit_val_batches=0,  # held-out evaluation is the arms' own eval stage
        num_sanity_val_steps=0,
        log_every_n_steps=5,
        default_root_dir=str(run_dir),
        devices=1,
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*limit_val_batches=0.*")
        trainer.fit(module, data)
    train_seconds = time.perf_counter() - start
    trainer.save_checkpoint(str(run_dir / "last.ckpt"))  # CompressionRetention(on="checkpoint") measures here
    write_json(run_dir / "retention.json", {"ops": settings.retention_ops, "history": retention.history})
    record = {
        "arm": arm.name,
        "recipe": arm.recipe,
        "lambda": arm.lam,
        "seed": seed,
        "steps": trainer.global_step,
        "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - start,
        "final_train_loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
        # DipRegModule exports the adapter and DipMonitor its history into the logger's folder:
        "adapter": str(module.adapter_dir().relative_to(run_dir)),
        "monitor_history": str((module.adapter_dir().parent / "dip_history.json").relative_to(run_dir)),
        "monitor": monitor.history,
    }
    write_json(run_dir / TRAIN_DONE, record)
    return record
