"""What the monitors log, read back from the TensorBoard event files: each option of the HF Trainer callback
(``causal_every``, ``figures_every``, ``TENSORBOARD_LOGGING_DIR``, ``log_dir=``, ``history_file``) changes what is
logged where, its history file holds exactly the logged values, and a resumed Lightning run's scalars have no gap and
no duplicate step."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from peft import LoraConfig, get_peft_model
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader
from transformers import Trainer

from dipreg.callbacks import DipMonitor
from dipreg.callbacks.hf import DipMonitorCallback
from tests.conftest import make_tiny_model, quiet_training_args


def read_events(log_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    events.Reload()
    return events


def steps(events: EventAccumulator, tag: str, kind: str = "Scalars") -> list[int]:
    return [e.step for e in getattr(events, kind)(tag)]


def hf_run(tmp_path: Path, pairs, tokenizer, max_steps: int, **options) -> tuple[DipMonitorCallback, Path]:
    """A tiny HF Trainer run (lr 0, batch 2) with the monitor probing every step; returns it and the output dir."""
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(2, 40, (2 * max_steps, 12)).tolist()]
    out = tmp_path / "out"
    args = quiet_training_args(out, max_steps)
    monitor = DipMonitorCallback(pairs, tokenizer=tokenizer, every_n_steps=1, lenses=("logit", "causal"), **options)
    Trainer(model=make_tiny_model("llama"), args=args, train_dataset=data, callbacks=[monitor]).train()
    return monitor, out


def test_hf_defaults_log_every_lens_and_figure_on_every_probe_under_output_dir_runs(
    tmp_path, tiny_tokenizer, tiny_pairs, monkeypatch
):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    monitor, out = hf_run(tmp_path, tiny_pairs, tiny_tokenizer, 2)
    events = read_events(out / "runs")
    assert steps(events, "dip/logit/max_wrong_dip") == steps(events, "dip/causal/max_wrong_dip") == [0, 1, 2]
    assert steps(events, "dip/trajectories", "Images") == [0, 1, 2]
    assert steps(events, "dip/logit/max_wrong_dip_items", "Histograms") == [0, 1, 2]
    saved = json.loads((out / "dip_history.json").read_text())
    assert saved == {"lenses": ["logit", "causal"], "history": json.loads(json.dumps(monitor.history))}


def test_hf_options_thin_out_causal_and_figures_and_move_the_events_and_the_history(
    tmp_path, tiny_tokenizer, tiny_pairs, monkeypatch
):
    env_dir = tmp_path / "from-env"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(env_dir))
    _, out = hf_run(tmp_path, tiny_pairs, tiny_tokenizer, 3, causal_every=2, figures_every=2, history_file="h.json")
    assert not (out / "runs").exists(), "TENSORBOARD_LOGGING_DIR replaces <output_dir>/runs"
    events = read_events(env_dir)
    assert steps(events, "dip/logit/max_wrong_dip") == [0, 1, 2, 3]
    # causal_every=2: probes 0 and 2, and the last step's probe reads every lens
    assert steps(events, "dip/causal/max_wrong_dip") == [0, 2, 3]
    assert steps(events, "dip/trajectories", "Images") == [0, 2]  # figures_every=2
    assert steps(events, "dip/history", "Images") == [0, 2]
    assert steps(events, "dip/logit/max_wrong_dip_items", "Histograms") == [0, 2]
    assert not (out / "dip_history.json").exists()
    history = json.loads((out / "h.json").read_text())["history"]
    # the history file holds exactly what went to TensorBoard: every logged scalar, at its step, and nothing else
    logged: dict[int, dict[str, float]] = {}
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            logged.setdefault(event.step, {})[tag] = event.value
    assert [int(h["step"]) for h in history] == sorted(logged) == [0, 1, 2, 3]
    for entry in history:
        written = {k: v for k, v in entry.items() if k != "step" and v is not None}
        assert written.keys() == logged[int(entry["step"])].keys(), entry["step"]
        for key, value in written.items():
            assert value == pytest.approx(logged[int(entry["step"])][key], rel=1e-6), key
    assert ["dip/causal/accuracy" in h for h in history] == [True, False, True, True]


def test_hf_log_dir_wins_over_the_environment(tmp_path, tiny_tokenizer, tiny_pairs, monkeypatch):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "from-env"))
    explicit = tmp_path / "explicit"
    _, out = hf_run(tmp_path, tiny_pairs[:2], tiny_tokenizer, 1, log_dir=str(explicit))
    assert steps(read_events(explicit), "dip/logit/accuracy") == [0, 1]
    assert not (tmp_path / "from-env").exists() and not (out / "runs").exists()


class _LoRAModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = get_peft_model(make_tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))

    def training_step(self, batch, batch_idx):
        return self.net(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=1e-2)


class _KillAt(pl.Callback):
    """Raises after optimizer step ``step``, as a killed job stops: no end-of-training hooks run."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"killed at step {self.step}")


def test_a_resumed_lightning_run_logs_every_probe_step_once_in_the_same_log_dir(tmp_path, tiny_tokenizer, tiny_pairs):
    data = DataLoader(list(torch.randint(2, 40, (16, 12), generator=torch.Generator().manual_seed(0))), batch_size=2)

    def fit(max_steps: int, callbacks: list, ckpt_path: str | None = None) -> None:
        pl.Trainer(
            default_root_dir=tmp_path,
            max_steps=max_steps,
            accelerator="cpu",
            logger=TensorBoardLogger(tmp_path, name="tb", version=0),  # the resumed run writes where the first did
            callbacks=callbacks,
            enable_progress_bar=False,
            enable_model_summary=False,
        ).fit(_LoRAModule(), data, ckpt_path=ckpt_path)

    def monitor() -> DipMonitor:
        return DipMonitor(tiny_pairs, tokenizer=tiny_tokenizer, every_n_steps=2, lenses=("logit",), log_figures=False)

    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    with pytest.raises(RuntimeError, match="killed"):  # killed at step 3, after the probe and checkpoint of step 2
        fit(6, [monitor(), saver, _KillAt(3)])
    fit(6, [monitor()], ckpt_path=str(next((tmp_path / "ckpt").glob("*step=2*.ckpt"))))
    log_dir = tmp_path / "tb" / "version_0"
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 2  # one events file per run, one folder
    events = read_events(log_dir)
    for tag in ("dip/logit/accuracy", "dip/logit/max_wrong_dip"):
        assert steps(events, tag) == [0, 2, 4, 6], tag
    history = json.loads((log_dir / "dip_history.json").read_text())["history"]
    assert [int(h["step"]) for h in history] == [0, 2, 4, 6]  # the resumed run's history continues the first's
    logged = [e.value for e in events.Scalars("dip/logit/accuracy")]
    assert [h["dip/logit/accuracy"] for h in history] == pytest.approx(logged, rel=1e-6)
