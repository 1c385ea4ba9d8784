"""The HF callback in a real TRL ``SFTTrainer`` run: LoRA from ``peft_config``, gradient checkpointing, a learning
rate above 0, probes every 2 steps. Its scalars reach ``state.log_history``, TensorBoard and an MLflow file store
through ``report_to``; the last probe equals ``dipreg.trajectories`` of the trained weights; a run resumed from a
checkpoint continues the history with no step repeated or lost. And the README's "Use it with TRL" example runs as
written."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dipreg.callbacks.hf import DipMonitorCallback
from dipreg.callbacks.probe import find_hf_model
from tests.conftest import make_tiny_model, requires_extra
from tests.dip_reference import reference_scalars
from tests.readme_examples import readme_example
from tests.test_callbacks import read_events, read_layout

TEXTS = ["Alice chased Bob .", "ice is cold .", "fire is hot .", "the cat chased the dog .", "Bob is good ."]
LENSES = ("logit", "causal")


def sft_trainer(out: Path, tokenizer: Any, max_steps: int, monitor: DipMonitorCallback, **config: Any) -> Any:
    """A TRL SFTTrainer on a tiny random Llama with LoRA (``peft_config``), gradient checkpointing, lr 1e-2
    (constant, so that a run resumed with a larger ``max_steps`` trains on as the first would have), a checkpoint
    every 4 steps, and ``monitor``."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        gradient_checkpointing=True,
        save_steps=4,
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
        eos_token=".",  # the tiny word-level tokenizer has no EOS token of its own
        dataloader_num_workers=0,
        **config,
    )
    return SFTTrainer(
        model=make_tiny_model("llama"),
        args=args,
        train_dataset=Dataset.from_dict({"text": TEXTS}),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        callbacks=[monitor],
    )


def dip_entries(log_history: list[dict[str, float]]) -> dict[int, dict[str, float]]:
    """The log-history entries that carry dip scalars, by step (a repeated step would be caught by the caller)."""
    entries = [e for e in log_history if any(k.startswith("dip/") for k in e)]
    by_step = {int(e["step"]): e for e in entries}
    assert len(by_step) == len(entries), [e["step"] for e in entries]
    return by_step


def tensorboard_steps(folder: Path, tag: str) -> list[int]:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return sorted(e.step for e in events.Scalars(tag))


def mlflow_steps(tracking_uri: str, key: str) -> tuple[str, list[int], list[float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    history = sorted(client.get_metric_history(runs[0].info.run_id, key), key=lambda m: m.step)
    return runs[0].info.run_id, [m.step for m in history], [m.value for m in history]


@requires_extra("trl", "trl")
@requires_extra("datasets", "trl")
@requires_extra("mlflow", "loggers")
def test_sft_trainer_with_lora_logs_dips_everywhere_and_a_resumed_run_continues_the_history(
    tmp_path, tiny_tokenizer, tiny_pairs, monkeypatch
):
    tracking_uri = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 refuses a file store without it
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))  # both runs in one folder
    out = tmp_path / "out"

    first = sft_trainer(
        out,
        tiny_tokenizer,
        4,
        DipMonitorCallback(tiny_pairs, every_n_steps=2, lenses=LENSES),
        report_to=["tensorboard", "mlflow"],
    )
    first.train()
    key = "dip/causal/max_wrong_dip"
    assert sorted(dip_entries(first.state.log_history)) == [0, 2, 4]
    run_id, steps, first_values = mlflow_steps(tracking_uri, key)
    assert steps == [0, 2, 4]
    assert first_values == pytest.approx([dip_entries(first.state.log_history)[s][key] for s in steps])

    # the trained LoRA weights: the last probe equals trajectories of the live model, and training moved it
    model = find_hf_model(first.model)
    last = dip_entries(first.state.log_history)[4]
    for name, value in reference_scalars(model, tiny_tokenizer, tiny_pairs).items():
        assert last[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert last["dip/logit/max_wrong_dip"] != dip_entries(first.state.log_history)[0]["dip/logit/max_wrong_dip"]

    # resume from the step-4 checkpoint into the same MLflow run, with a new monitor: 6 and 8 follow 0, 2, 4
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    monitor = DipMonitorCallback(tiny_pairs, every_n_steps=2, lenses=LENSES)
    second = sft_trainer(out, tiny_tokenizer, 8, monitor, report_to=["tensorboard", "mlflow"])
    second.train(resume_from_checkpoint=str(out / "checkpoint-4"))
    assert [int(h["step"]) for h in monitor.history] == [0, 2, 4, 6, 8]
    assert monitor.history[:3] == [
        {k: v for k, v in dip_entries(first.state.log_history)[s].items() if k != "step"} | {"step": float(s)}
        for s in (0, 2, 4)
    ]
    assert sorted(dip_entries(second.state.log_history)) == [0, 2, 4, 6, 8]
    assert mlflow_steps(tracking_uri, key)[1] == [0, 2, 4, 6, 8]
    # the Trainer's TensorBoard integration writes every training log key under train/
    assert tensorboard_steps(tmp_path / "tb", f"train/{key}") == [0, 2, 4, 6, 8]
    final = reference_scalars(find_hf_model(second.model), tiny_tokenizer, tiny_pairs)
    assert monitor.history[-1][key] == pytest.approx(final[key], rel=1e-5, abs=1e-6)


@requires_extra("trl", "trl")
@requires_extra("datasets", "trl")
def test_the_readme_trl_example_runs_as_written(tmp_path, tiny_tokenizer, tiny_pairs, monkeypatch):
    from datasets import Dataset
    from trl import SFTConfig

    monkeypatch.chdir(tmp_path)  # the example's output_dir is relative
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    config = SFTConfig(
        output_dir="out/sft",
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        save_steps=2,
        report_to=["tensorboard"],
        use_cpu=True,
        disable_tqdm=True,
        eos_token=".",
    )
    scope = {
        "model": make_tiny_model("llama"),
        "tokenizer": tiny_tokenizer,
        "dataset": Dataset.from_dict({"text": TEXTS}),
        "config": config,
        "probe_pairs": tiny_pairs,
        "every": 2,
    }
    exec(compile(readme_example("### Use it with TRL"), "README.md", "exec"), scope)
    monitor, trainer = scope["monitor"], scope["trainer"]
    assert [int(h["step"]) for h in monitor.history] == [0, 2, 4]
    assert sorted(dip_entries(trainer.state.log_history)) == [0, 2, 4]
    assert "dip/agreement/sign" in monitor.history[-1]
    [run] = (tmp_path / "out" / "sft" / "runs").iterdir()  # the Trainer's TensorBoard folder
    assert tensorboard_steps(run, "train/dip/causal/max_wrong_dip") == [0, 2, 4]
    # the monitor's figures and layout went into the Trainer's own writer, the layout naming its train/ tags
    events = read_events(run)
    assert "dip/trajectories" in events.Tags()["images"]
    logged = [tag for tag in events.Tags()["scalars"] if tag.startswith("train/dip/")]
    patterns = [regex for charts in read_layout(events).values() for tags in charts.values() for regex in tags]
    assert patterns and all(len([t for t in logged if re.fullmatch(regex, t)]) == 1 for regex in patterns)
    saved = json.loads((tmp_path / "out" / "sft" / "checkpoint-4" / "trainer_state.json").read_text())
    assert [h["step"] for h in saved["stateful_callbacks"]["DipMonitorCallback"]["attributes"]["history"]] == [0, 2, 4]
