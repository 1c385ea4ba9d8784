"""DipMonitor's scalars and figures reach every logger of a Lightning fit, read back from what each one wrote:
the TensorBoard event file, the W&B offline run folder, the MLflow file store and the CSV log folder."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_tiny_model, quiet_trainer
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger
from peft import LoraConfig, get_peft_model
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from dipreg.callbacks import DipMonitor

KEY = "dip/logit/max_wrong_dip"
STEPS = [0, 2, 4]


class LoRAModule(pl.LightningModule):
    def __init__(self, tokenizer) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = get_peft_model(make_tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        self.tokenizer = tokenizer

    def training_step(self, batch, batch_idx):
        return self.net(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5)


@pytest.fixture(scope="module")
def logged(tmp_path_factory, tiny_tokenizer, tiny_pairs) -> dict:
    """One fit (4 steps, a probe every 2) logging to TensorBoard, W&B (offline), MLflow (file store) and CSV."""
    import wandb

    root = tmp_path_factory.mktemp("loggers")
    with pytest.MonkeyPatch.context() as env:
        # MLflow 3 refuses a file: store unless asked (it is "in maintenance mode"); the issue asks for one.
        env.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        env.setenv("WANDB_SILENT", "true")
        return fit_with_every_logger(root, tiny_tokenizer, tiny_pairs, wandb)


def fit_with_every_logger(root: Path, tiny_tokenizer, tiny_pairs, wandb) -> dict:
    loggers = {
        "tb": TensorBoardLogger(root, name="tb", version=0),
        "wandb": WandbLogger(save_dir=str(root), offline=True, project="dip"),
        "mlflow": MLFlowLogger(experiment_name="dip", tracking_uri=f"file:{root / 'mlruns'}"),
        "csv": CSVLogger(root, name="csv", version=0),
    }
    monitor = DipMonitor(tiny_pairs, every_n_steps=2, lenses=("logit",))
    data = DataLoader(list(torch.randint(2, 40, (8, 12), generator=torch.Generator().manual_seed(0))), batch_size=2)
    quiet_trainer(root, [monitor], max_steps=4, logger=list(loggers.values()), enable_checkpointing=False).fit(
        LoRAModule(tiny_tokenizer), data
    )
    wandb_dir = Path(loggers["wandb"].experiment.dir)
    wandb.finish()
    return {"root": root, "loggers": loggers, "history": monitor.history, "wandb_dir": wandb_dir}


def history_values(logged: dict) -> dict[int, float]:
    return {int(h["step"]): h[KEY] for h in logged["history"]}


def test_tensorboard_gets_scalars_and_an_image_summary_per_probe(logged):
    events = EventAccumulator(str(logged["root"] / "tb" / "version_0"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert {e.step: e.value for e in events.Scalars(KEY)} == pytest.approx(history_values(logged))
    assert [e.step for e in events.Images("dip/trajectories")] == STEPS
    assert [e.step for e in events.Images("dip/history")] == STEPS


def test_wandb_offline_run_holds_the_figures_as_media_files(logged):
    media = logged["wandb_dir"] / "media" / "images" / "dip"
    for name in ("trajectories", "history"):
        files = sorted(media.glob(f"{name}_*.png"))
        assert len(files) == len(STEPS), (name, [p.name for p in media.iterdir()] if media.exists() else "no media")
        assert all(f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in files)
    # wandb writes each history row twice into the file (the request and the record it becomes)
    assert list(dict.fromkeys(wandb_values(logged["wandb_dir"].parent, KEY))) == pytest.approx(
        list(history_values(logged).values())
    )


def wandb_values(run_dir: Path, key: str) -> list[float]:
    """The values logged under ``key``, in order, read from the offline run's ``.wandb`` file.

    wandb 0.31 ships no Python reader for that file (its core is in Go), so this reads the protobuf bytes of each
    history item: the key (field 2: tag byte 0x12, a length byte) followed by its ``value_json`` (field 16: tag
    bytes 0x82 0x01, a length byte). A summary item holds its key in field 1, so it does not match.
    """
    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    marker = b"\x12" + bytes([len(key)]) + key.encode() + b"\x82\x01"
    values, start = [], data.find(marker)
    while start >= 0:
        at = start + len(marker)
        values.append(json.loads(data[at + 1 : at + 1 + data[at]]))
        start = data.find(marker, at)
    return values


def test_mlflow_file_store_holds_the_metrics_and_a_figure_artifact_per_probe(logged):
    from mlflow.tracking import MlflowClient

    logger = logged["loggers"]["mlflow"]
    client = MlflowClient(tracking_uri=f"file:{logged['root'] / 'mlruns'}")
    metrics = {m.step: m.value for m in client.get_metric_history(logger.run_id, KEY)}
    assert metrics == pytest.approx(history_values(logged))
    for name in ("trajectories", "history"):
        files = [Path(a.path).name for a in client.list_artifacts(logger.run_id, f"dip/{name}")]
        assert files == [f"step_{step:06d}.png" for step in STEPS], name


def test_csv_logger_gets_the_metrics_and_the_figures_as_png_files_under_its_log_dir(logged):
    log_dir = logged["root"] / "csv" / "version_0"
    rows = list(csv.DictReader((log_dir / "metrics.csv").open()))
    logged_values = {int(r["step"]): float(r[KEY]) for r in rows if r.get(KEY)}
    assert logged_values == pytest.approx(history_values(logged))
    for name in ("trajectories", "history"):
        files = sorted((log_dir / "dip" / name).glob("*.png"))
        assert [f.name for f in files] == [f"step_{step:06d}.png" for step in STEPS], name
        assert all(f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in files)
