"""A tiny LoRA fit (DipRegModule on a tiny Llama) watched by DipMonitor and DipAlert, with its wrong-dip made to
regress after accuracy saturated. Run by ``tests/test_dip_alert.py``: in-process for one process (:func:`fit`), and
for two as ``python tests/dip_alert_run.py OUT`` started once per rank by ``sharded_run.launch`` (DDP on CPU/gloo).

The planted fault is a real training signal, not an edited number: from optimizer step :data:`PLANT_START` on, an
auxiliary loss (:class:`RewardWrongMidMargin`) rewards every mid-depth layer for preferring the WRONG answer through
the logit lens, while the answer-token CE keeps the output right. Accuracy stays saturated and the logit-lens dip
rises; the monitor reads it with real probes of the live weights.

Each rank writes ``OUT/<fit>/rank<r>.json`` for the fits ``planted``, ``healthy`` (the same fit without the fault)
and ``split`` (planted, but rank 0 waits for 2 regressed probes and rank 1 for 3: the ranks stop together only
because the alert reduces its decision over them).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_tiny_model, tiny_tokenizer
from sharded_run import PAIRS

from dipreg.callbacks import DipAlert, DipMonitor
from dipreg.losses import AuxLoss, BatchView
from dipreg.metrics import DEFAULT_WINDOW, depth_mask
from dipreg.stimuli import save_pairs
from dipreg.training import DipRegModule, PairDataModule

#: The optimizer step from which the planted loss acts, the fit's length, and the monitor's cadence.
PLANT_START = 10
MAX_STEPS = 20
EVERY_N_STEPS = 2
#: The alert: logit and causal lenses, saturated at accuracy 1, a rise of more than 0.2 for PATIENCE probes in a row.
ALERT = {"lenses": ("logit", "causal"), "min_accuracy": 1.0, "max_rise": 0.2}
PATIENCE = 2
#: The fits the two-process run makes, in order ("split" last: without the reduction its ranks would part ways).
FITS = ("planted", "healthy", "split")


class RewardWrongMidMargin(AuxLoss):
    """The planted fault: ``relu(1 + margin)`` over the layers of the dip window, i.e. a reward for every mid-depth
    layer whose logit lens prefers the wrong answer by a margin of 1; zero (still in the graph) while not ``active``."""

    name = "wrong_mid"

    def __init__(self, weight: float = 0.3) -> None:
        super().__init__(weight)
        self.active = False

    def __call__(self, view: BatchView) -> Tensor:
        layers = [int(i) for i in depth_mask(view.residuals.shape[0], DEFAULT_WINDOW).nonzero().flatten()]
        margins = view.adapter.margin(view.residuals[layers], view.correct_ids, view.wrong_ids)
        loss = torch.relu(1.0 + margins).mean()
        return loss if self.active else loss * 0.0


class PlantSwitch(Callback):
    """Turns the planted loss on from optimizer step ``start`` (by ``global_step``, so a resumed fit agrees)."""

    def __init__(self, plant: RewardWrongMidMargin, start: int) -> None:
        self.plant, self.start = plant, start

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        self.plant.active = trainer.global_step >= self.start


def fit(
    out: Path,
    *,
    planted: bool = True,
    patience: int = PATIENCE,
    action: str = "stop",
    max_steps: int = MAX_STEPS,
    devices: int = 1,
    callbacks: tuple[Callback, ...] = (),
    ckpt_path: str | None = None,
) -> dict[str, Any]:
    """One fit of 14 examples (7 pairs) a step, the whole set every step (one process: one batch of 14; two: 7 per
    rank, gradients averaged, so the same update). Returns what happened, as :func:`record` writes it."""
    rank = int(os.environ.get("RANK", "0"))
    out.mkdir(parents=True, exist_ok=True)
    pairs = str(save_pairs(PAIRS, out / f"pairs-rank{rank}.jsonl"))
    pl.seed_everything(0, verbose=False)
    plant = RewardWrongMidMargin()
    module = DipRegModule(
        model=make_tiny_model("llama"),
        tokenizer=tiny_tokenizer.__wrapped__(),  # the conftest fixture's function
        r=4,
        alpha=8,
        dropout=0.0,
        lr=0.02,
        aux_losses=[plant],
    )
    monitor = DipMonitor(PAIRS, every_n_steps=EVERY_N_STEPS, lenses=("logit", "causal"), log_figures=False)
    alert = DipAlert(**ALERT, patience=patience, action=action)  # type: ignore[arg-type]
    switch = PlantSwitch(plant, PLANT_START if planted else max_steps + 1)
    trainer = pl.Trainer(
        default_root_dir=out,
        max_steps=max_steps,
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        logger=False,
        callbacks=[switch, monitor, alert, *callbacks],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(cb, pl.callbacks.ModelCheckpoint) for cb in callbacks),
    )
    data = PairDataModule(train=pairs, val=[], batch_size=14 // devices, shuffle=False, prompt="raw")
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return {
        "global_step": trainer.global_step,
        "stopped_step": alert.stopped_step,
        "alarms": [alarm.message() for alarm in alert.alarms],
        "alarm_steps": [alarm.step for alarm in alert.alarms],
        "alarm_lenses": [alarm.lens for alarm in alert.alarms],
        "history": monitor.history,
        "alert_state": alert.state_dict(),
    }


if __name__ == "__main__":
    torch.set_num_threads(1)
    root, rank = Path(sys.argv[1]), int(os.environ["RANK"])
    for name in FITS:
        patience = PATIENCE + rank if name == "split" else PATIENCE
        record = fit(root / name, planted=name != "healthy", patience=patience, devices=2)
        (root / name / f"rank{rank}.json").write_text(json.dumps(record))
