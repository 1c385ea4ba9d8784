"""The dip monitor as an HF TrainerCallback: a short real run of the default model, and its history file (strict
JSON, written atomically) on a tiny one."""

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import Trainer

from dipreg import artifacts
from dipreg.callbacks.hf import DipMonitorCallback
from dipreg.stimuli import load_pairs
from tests.conftest import quiet_training_args


def _end_of_training(monitor: DipMonitorCallback, output_dir: Path) -> Path:
    monitor.on_train_end(SimpleNamespace(output_dir=str(output_dir)), SimpleNamespace(is_world_process_zero=True), None)
    return output_dir / monitor.history_file


def test_history_is_strict_json_written_atomically(tmp_path, tiny_pairs, tiny_tokenizer, monkeypatch):
    monitor = DipMonitorCallback(tiny_pairs, tokenizer=tiny_tokenizer, lenses=("logit",))
    monitor.history = [{"step": 0.0, "dip/logit/accuracy": 0.75}]
    path = _end_of_training(monitor, tmp_path)
    before = path.read_text()
    assert json.loads(before)["history"] == monitor.history

    monitor.history.append({"step": 15.0, "dip/logit/accuracy": math.nan})  # a diverged model's probe
    real_replace = os.replace

    def killed(src, dst):
        if Path(dst) == path:
            raise OSError("injected: killed before the rename")
        return real_replace(src, dst)

    monkeypatch.setattr(artifacts.os, "replace", killed)
    with pytest.raises(OSError, match="injected"):
        _end_of_training(monitor, tmp_path)
    monkeypatch.setattr(artifacts.os, "replace", real_replace)
    assert path.read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    text = _end_of_training(monitor, tmp_path).read_text()
    assert "NaN" not in text and json.loads(text)["history"][1]["dip/logit/accuracy"] is None


@pytest.mark.integration
def test_hf_trainer_run_logs_dips_to_tensorboard(tmp_path, default_model):
    model, tokenizer = default_model
    probe = load_pairs("core")[::35] + load_pairs("role_binding")[::50]
    texts = ["The cat sat on the mat.", "Paris is the capital of France.", "Ice is cold and fire is hot."] * 2
    data = [{"input_ids": ids, "labels": ids} for ids in (tokenizer(t).input_ids for t in texts)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = quiet_training_args(tmp_path / "out", 2, batch_size=1)
    monitor = DipMonitorCallback(probe, tokenizer=tokenizer, every_n_steps=1, lenses=("logit",))
    Trainer(model=model, args=args, train_dataset=data, callbacks=[monitor]).train()
    events = EventAccumulator(str(tmp_path / "out" / "runs"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("dip/logit/max_wrong_dip")] == [0, 1, 2]
    assert "dip/trajectories" in events.Tags()["images"]
    assert monitor.history[0]["dip/logit/accuracy"] == pytest.approx(events.Scalars("dip/logit/accuracy")[0].value)
    assert (tmp_path / "out" / "dip_history.json").is_file()
    for name, p in model.named_parameters():  # lr=0: the shared session model is left as it was
        assert torch.equal(p, before[name]), name
