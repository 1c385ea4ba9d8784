"""DipMonitor follows Lightning's conventions: its scalars are in ``trainer.callback_metrics`` after each probe, so
``EarlyStopping`` and ``ModelCheckpoint`` can watch a dip, wherever the monitor stands in the callback list and
across a resume."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_tiny_model, quiet_trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader

from dipreg.callbacks import DipMonitor

KEY = "dip/logit/max_wrong_dip"


class LoRAModule(pl.LightningModule):
    def __init__(self, tokenizer, lr: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = get_peft_model(make_tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        self.tokenizer = tokenizer
        self.lr = lr

    def training_step(self, batch, batch_idx):
        return self.net(input_ids=batch, labels=batch).loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.net(input_ids=batch, labels=batch).loss)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def batches(n: int, seed: int = 0) -> DataLoader:
    return DataLoader(list(torch.randint(2, 40, (n, 12), generator=torch.Generator().manual_seed(seed))), batch_size=2)


def fit(tmp_path: Path, module: pl.LightningModule, callbacks: list, *, val: bool = False, **kwargs) -> pl.Trainer:
    trainer = quiet_trainer(tmp_path, callbacks, num_sanity_val_steps=0, **kwargs)
    trainer.fit(module, batches(4), batches(2, seed=1) if val else None)
    return trainer


class SeenAtValidationEnd(pl.Callback):
    """Records ``trainer.callback_metrics[KEY]`` at each validation end, as EarlyStopping or ModelCheckpoint placed
    at the same position of the callback list would read it."""

    def __init__(self) -> None:
        self.seen: dict[int, float] = {}

    def on_validation_end(self, trainer, pl_module) -> None:
        self.seen[trainer.global_step] = float(trainer.callback_metrics[KEY])


def test_early_stopping_on_a_dip_that_does_not_improve_stops_after_patience(tmp_path, tiny_tokenizer, tiny_pairs):
    """lr 0: the dip never improves; EarlyStopping checks at each train epoch end (2 steps an epoch), where the
    monitor has just probed, and stops after ``patience`` checks without a new minimum."""
    monitor = DipMonitor(tiny_pairs, every_n_steps=2, lenses=("logit",), log_figures=False)
    stopper = EarlyStopping(monitor=KEY, mode="min", patience=2, check_on_train_epoch_end=True)
    trainer = fit(tmp_path, LoRAModule(tiny_tokenizer, lr=0.0), [stopper, monitor], max_epochs=20)
    # checks after epochs 0, 1, 2: a first best, then two without improvement
    assert stopper.stopped_epoch == 2 and trainer.global_step == 6
    assert [int(h["step"]) for h in monitor.history] == [0, 2, 4, 6]
    assert float(stopper.best_score) == monitor.history[1][KEY]


def test_early_stopping_reads_each_validation_probe_even_listed_before_the_monitor(
    tmp_path, tiny_tokenizer, tiny_pairs
):
    """With ``on_validation_end=True`` the probe of a validation run is in ``callback_metrics`` before any
    callback's ``on_validation_end`` (lr > 0, so a stale value would differ)."""
    spy = SeenAtValidationEnd()
    stopper = EarlyStopping(monitor=KEY, mode="min", patience=100)
    monitor = DipMonitor(tiny_pairs, every_n_steps=1000, lenses=("logit",), log_figures=False, on_validation_end=True)
    fit(
        tmp_path,
        LoRAModule(tiny_tokenizer, lr=0.5),
        [spy, stopper, monitor],
        val=True,
        max_steps=6,
        val_check_interval=2,
    )
    by_step = {int(h["step"]): h[KEY] for h in monitor.history}
    assert sorted(by_step) == [0, 2, 4, 6]
    assert spy.seen == {step: pytest.approx(by_step[step]) for step in (2, 4, 6)}
    assert len({round(v, 6) for v in spy.seen.values()}) > 1  # the dip moved, so staleness would show
    assert float(stopper.best_score) == pytest.approx(min(spy.seen.values()))


class SeenAtFirstBatch(pl.Callback):
    """Records ``trainer.callback_metrics.get(KEY)`` before the first batch of a fit."""

    def __init__(self) -> None:
        self.seen: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.seen is None and KEY in trainer.callback_metrics:
            self.seen = float(trainer.callback_metrics[KEY])


def test_model_checkpoint_keeps_the_lowest_dip_and_continues_after_a_resume(tmp_path, tiny_tokenizer, tiny_pairs):
    spy = SeenAtFirstBatch()

    def run(max_steps: int, ckpt_path: str | None = None) -> tuple[DipMonitor, ModelCheckpoint]:
        monitor = DipMonitor(tiny_pairs, every_n_steps=2, lenses=("logit",), log_figures=False)
        keeper = ModelCheckpoint(
            dirpath=tmp_path / "ckpt", monitor=KEY, mode="min", save_top_k=1, save_last=True, every_n_train_steps=2
        )
        trainer = quiet_trainer(tmp_path, [keeper, monitor, spy], max_steps=max_steps)
        trainer.fit(LoRAModule(tiny_tokenizer, lr=0.5), batches(4), ckpt_path=ckpt_path)
        return monitor, keeper

    first, _ = run(4)
    assert [int(h["step"]) for h in first.history] == [0, 2, 4]
    spy.seen = None
    monitor, keeper = run(10, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    history = monitor.history
    assert [int(h["step"]) for h in history] == [0, 2, 4, 6, 8, 10]  # continued, no gap, no duplicate
    assert history[:3] == first.history
    assert spy.seen == history[2][KEY]  # the resumed fit starts with the checkpoint's last dip in callback_metrics
    saved = {int(h["step"]): h[KEY] for h in history if h["step"] > 0}  # ModelCheckpoint runs at steps 2, 4, ...
    assert len(set(saved.values())) > 1
    best_step = min(saved, key=saved.get)
    assert float(keeper.best_model_score) == saved[best_step]
    assert f"step={best_step}.ckpt" in Path(keeper.best_model_path).name
