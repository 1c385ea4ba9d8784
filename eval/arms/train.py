"""Train one arm × seed of `dipreg arms`: the recipe's LoRA SFT with DipMonitor on and CompressionRetention at the end.

The arm is instantiated through the same LightningCLI as `dipreg fit` (:func:`dipreg.training.fit.build_cli`), from the
recipe (λ applied) written to ``recipe.yaml`` in the run folder, so every recipe setting applies; the arms runner
overrides only the seed, the base model, the sizes of :class:`ArmsSettings`, the logger and its own callbacks.

A :class:`StepTimer` records the wall time of every training step (``step_seconds_median`` in ``train.json``: the
hinge overhead of an arm is its median step time over output_only's). Everything a later stage needs lands in the
run folder: ``recipe.yaml``, ``tb/adapter/`` (PEFT ``save_pretrained``), ``tb/dip_history.json`` (the DipMonitor
history), ``tb/heldout.json`` (the recipe's HeldOutEval), ``tb/config.yaml`` (the configuration as parsed),
``retention.json`` (CompressionRetention at the last step), the TensorBoard events, and ``train.json``, written
last, which marks the run as finished (resume skips it).
"""

from __future__ import annotations

import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import lightning.pytorch as pl
import yaml

from dipreg.artifacts import write_json
from dipreg.callbacks.compression_retention import CompressionRetention
from dipreg.callbacks.dip_monitor import DipMonitor
from dipreg.eval.arms.plan import ArmSpec, ArmsSettings
from dipreg.stimuli import load_pairs
from dipreg.training.data import PairDataModule
from dipreg.training.fit import build_cli
from dipreg.training.module import DipRegModule

__all__ = ["RECIPE_FILE", "TRAIN_DONE", "ArmRun", "arm_cli_args", "build_arm_run", "limited_pairs", "train_arm"]

#: The file that marks a finished training run.
TRAIN_DONE = "train.json"
#: The recipe an arm was trained with (λ applied), as given to the LightningCLI before the arms' overrides.
RECIPE_FILE = "recipe.yaml"


class StepTimer(pl.Callback):
    """Wall time of every training batch (forward, backward, optimizer step), from ``on_train_batch_start`` to
    ``on_train_batch_end``; listed before the DipMonitor, so its probes are not counted."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        self.seconds.append(time.perf_counter() - self._start)

    def summary(self) -> dict[str, float | None]:
        """Median step time over the steps after the first (the first pays one-off warm-up) and the total."""
        steady = self.seconds[1:] or self.seconds
        return {
            "step_seconds_median": statistics.median(steady) if steady else None,
            "step_seconds_total": sum(self.seconds),
        }


class ArmRun(NamedTuple):
    """One arm × seed, instantiated and ready to fit."""

    module: DipRegModule
    data: PairDataModule
    trainer: pl.Trainer
    monitor: DipMonitor
    retention: CompressionRetention
    timer: StepTimer | None = None


def limited_pairs(name: str, limit: int | None) -> list:
    """The first ``limit`` pairs of set ``name`` (all when ``limit`` is ``None``)."""
    pairs = load_pairs(name)
    return pairs if limit is None else pairs[:limit]


def arm_cli_args(
    recipe_file: Path, seed: int, settings: ArmsSettings, run_dir: Path, model_name: str | None
) -> list[str]:
    """The LightningCLI arguments of one arm × seed: the recipe first, then what the arms runner fixes.

    Everything not listed here (``trainer.gradient_clip_val``, ``trainer.log_every_n_steps``, ``heldout.*``, ...)
    comes from the recipe exactly as in `dipreg fit`. The base model is always the run's ``model_name`` (``None``:
    the embedded default), the one the evaluation stage loads the adapter into.
    """
    logger = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        # run_dir/tb is the log dir: the adapter, dip_history.json and heldout.json land there
        "init_args": {"save_dir": str(run_dir), "name": "tb", "version": ""},
    }
    args = [
        "--config",
        str(recipe_file),
        "--seed_everything",
        str(seed),
        "--model.model_name",
        "null" if model_name is None else model_name,
        "--data.prompt",
        settings.prompt,
        "--trainer.logger",
        json.dumps(logger),
        "--trainer.enable_checkpointing",
        "false",  # the one checkpoint is written by train_arm, which also triggers the retention eval
        "--trainer.enable_progress_bar",
        "false",  # the arms runner shows one progress bar for the whole run
        "--trainer.enable_model_summary",
        "false",
        "--trainer.limit_val_batches",
        "0",  # held-out evaluation is the arms' own eval stage
        "--trainer.num_sanity_val_steps",
        "0",
        "--trainer.devices",
        "1",
        "--trainer.default_root_dir",
        str(run_dir),
    ]
    if settings.max_steps is not None:
        args += ["--trainer.max_steps", str(settings.max_steps)]
    if settings.batch_size is not None:
        args += ["--data.batch_size", str(settings.batch_size)]
    if settings.heldout_sets is not None:
        args += ["--heldout.sets", json.dumps([s.strip() for s in settings.heldout_sets.split(",") if s.strip()])]
    return args


def build_arm_run(
    arm: ArmSpec, seed: int, settings: ArmsSettings, run_dir: Path, model_name: str | None = None
) -> ArmRun:
    """Instantiate ``arm`` × ``seed`` through the `dipreg fit` LightningCLI without fitting.

    Writes the arm's recipe (λ applied) to ``run_dir/recipe.yaml`` and parses it with the arms' overrides
    (:func:`arm_cli_args`); DipMonitor and CompressionRetention are added to the recipe's callbacks.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    recipe_file = run_dir / RECIPE_FILE
    recipe_file.write_text(yaml.safe_dump(arm.recipe_config(), sort_keys=False))
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
    timer = StepTimer()
    cli = build_cli(
        arm_cli_args(recipe_file, seed, settings, run_dir, model_name),
        run=False,
        trainer_defaults={"callbacks": [timer, monitor, retention]},  # no RichProgressBar: the bar is off here
    )
    return ArmRun(cli.model, cli.datamodule, cli.trainer, monitor, retention, timer)


def train_arm(
    arm: ArmSpec, seed: int, settings: ArmsSettings, run_dir: Path, *, model_name: str | None = None
) -> dict[str, Any]:
    """Train ``arm`` with ``seed`` into ``run_dir`` and return the contents of ``train.json``."""
    module, data, trainer, monitor, retention, timer = build_arm_run(arm, seed, settings, run_dir, model_name)
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
        **(timer.summary() if timer is not None else {}),
        "total_seconds": time.perf_counter() - start,
        "final_train_loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
        # DipRegModule exports the adapter and DipMonitor its history into the logger's folder:
        "adapter": str(module.adapter_dir().relative_to(run_dir)),
        "monitor_history": str((module.adapter_dir().parent / "dip_history.json").relative_to(run_dir)),
        "monitor": monitor.history,
    }
    write_json(run_dir / TRAIN_DONE, record)
    return record
