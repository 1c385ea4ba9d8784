"""The dip monitor as an HF TrainerCallback: a short real run of the default model, its history file (strict JSON,
written atomically), keyword-only options, the gathering context it picks under DeepSpeed ZeRO-3 (a stand-in
``deepspeed``: the real one needs a GPU), transformers rebuilding it from a checkpoint, and the final probe of a run
stopped after the monitor's ``on_step_end``."""

import json
import math
import os
import sys
import types
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from dipreg import artifacts, trajectories
from dipreg.adapter import ModelAdapter
from dipreg.callbacks import DipMonitor, hf, sharding
from dipreg.callbacks.hf import DipMonitorCallback
from dipreg.stimuli import load_pairs
from tests.conftest import make_tiny_model, quiet_training_args
from tests.dip_reference import reference_scalars


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


def test_options_after_pairs_are_keyword_only_in_both_monitors():
    with pytest.raises(TypeError, match="positional argument"):
        DipMonitorCallback("core", 15)  # type: ignore[misc]
    with pytest.raises(TypeError, match="positional argument"):
        DipMonitor("core", 15)  # type: ignore[misc]


class _GatheredParameters:
    """``deepspeed.zero.GatheredParameters`` as the probe uses it: records what it gathers and while it is open."""

    calls: ClassVar[list[tuple[list[nn.Parameter], object]]] = []
    is_open: ClassVar[bool] = False

    def __init__(self, params: list[nn.Parameter], modifier_rank: object = None) -> None:
        self.params, self.modifier_rank = params, modifier_rank

    def __enter__(self) -> None:
        _GatheredParameters.calls.append((self.params, self.modifier_rank))
        _GatheredParameters.is_open = True

    def __exit__(self, *exc: object) -> None:
        _GatheredParameters.is_open = False


def test_under_zero3_each_rank_probes_its_shard_with_the_head_gathered_from_the_wrapped_model(
    tmp_path, tiny_tokenizer, tiny_pairs, monkeypatch
):
    model = make_tiny_model("llama")
    rank, world_size = 1, 2
    shard = tiny_pairs[rank::world_size]  # DipProbe's sharding: rank r measures pairs[r::world_size]
    expected = trajectories(model, tiny_tokenizer, shard, lens="logit").max_wrong_dip.double().mean().item()
    for index, param in enumerate(model.parameters()):  # what ZeRO-3 partitioning leaves on every parameter
        param.ds_id = index
    engine = nn.Module()  # the DeepSpeed engine stand-in: trainer.model_wrapped, holding the model
    engine.module = model
    monkeypatch.setitem(
        sys.modules,
        "deepspeed",
        types.SimpleNamespace(zero=types.SimpleNamespace(GatheredParameters=_GatheredParameters)),
    )
    monkeypatch.setattr(_GatheredParameters, "calls", [])
    reads_inside: list[bool] = []
    original = ModelAdapter.unembed_rows

    def unembed_rows(self, *args, **kwargs):
        reads_inside.append(_GatheredParameters.is_open)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ModelAdapter, "unembed_rows", unembed_rows)
    roots: list[nn.Module] = []
    backend = sharding.sharding_backend
    monkeypatch.setattr(sharding, "sharding_backend", lambda root: roots.append(root) or backend(root))
    logged: list[dict[str, float]] = []
    handler = SimpleNamespace(callbacks=[], on_log=lambda args, state, control, logs: logged.append(logs))
    monkeypatch.setattr(hf, "running_trainer", lambda: SimpleNamespace(model_wrapped=engine, callback_handler=handler))
    assert hf.probe_root(None, model) is model
    assert hf.probe_root(SimpleNamespace(model_wrapped=engine), model) is engine

    monitor = DipMonitorCallback(tiny_pairs, lenses=("logit",), log_dir=str(tmp_path / "tb"))
    args = SimpleNamespace(output_dir=str(tmp_path / "out"), process_index=rank, world_size=world_size)
    monitor.on_train_begin(
        args, TrainerState(is_world_process_zero=False), TrainerControl(), model=model, processing_class=tiny_tokenizer
    )
    assert roots == [engine]  # the strategy's wrapper, not the model inside it, decides what is gathered
    [(gathered, modifier_rank)] = _GatheredParameters.calls
    assert len(gathered) == 1 and gathered[0] is model.lm_head.weight and modifier_rank is None
    assert reads_inside and all(reads_inside)  # every unembedding read happened inside the gathering context
    assert logged[0]["dip/logit/max_wrong_dip"] == pytest.approx(expected, rel=1e-6)


def test_transformers_restoring_callback_states_rebuilds_the_monitor_with_its_pairs_and_history(
    tmp_path, tiny_tokenizer, tiny_pairs
):
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(2, 40, (16, 8)).tolist()]
    out = tmp_path / "out"

    def run(max_steps: int, resume: str | None = None) -> tuple[DipMonitorCallback, Trainer]:
        args = TrainingArguments(
            output_dir=str(out),
            max_steps=max_steps,
            per_device_train_batch_size=2,
            learning_rate=1e-2,
            lr_scheduler_type="constant",
            report_to=[],
            use_cpu=True,
            save_steps=4,
            disable_tqdm=True,
            restore_callback_states_from_checkpoint=True,
        )
        monitor = DipMonitorCallback(tiny_pairs, every_n_steps=2, lenses=("logit",))
        trainer = Trainer(
            model=make_tiny_model("llama"),
            args=args,
            train_dataset=data,
            processing_class=tiny_tokenizer,
            callbacks=[monitor],
        )
        trainer.train(resume_from_checkpoint=resume)
        return monitor, trainer

    first, _ = run(4)
    passed, trainer = run(8, str(out / "checkpoint-4"))
    [rebuilt] = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, DipMonitorCallback)]
    assert rebuilt is not passed and not passed.history  # transformers replaced the monitor it was given
    assert rebuilt.tracker.dip_probe.pairs == tiny_pairs
    assert [int(h["step"]) for h in rebuilt.history] == [0, 2, 4, 6, 8]
    assert rebuilt.history[:3] == first.history


class _StopAfter(TrainerCallback):
    """Stops training at the end of optimizer step ``step``, listed after the monitor (it sees no stop then)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_a_run_stopped_after_the_monitors_step_end_gets_its_final_probe_with_every_lens_at_train_end(
    tmp_path, tiny_tokenizer, tiny_pairs
):
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(2, 40, (16, 8)).tolist()]
    args = quiet_training_args(tmp_path / "out", 8)
    args.learning_rate = 1e-2
    monitor = DipMonitorCallback(tiny_pairs, tokenizer=tiny_tokenizer, every_n_steps=2, causal_every=2)
    model = make_tiny_model("llama")
    Trainer(model=model, args=args, train_dataset=data, callbacks=[monitor, _StopAfter(5)]).train()
    assert [int(h["step"]) for h in monitor.history] == [0, 2, 4, 5]
    final = reference_scalars(model, tiny_tokenizer, tiny_pairs)  # probe 3: causal_every=2 alone would skip causal
    assert {k: monitor.history[-1][k] for k in final} == pytest.approx(final, rel=1e-5, abs=1e-6)
    saved = json.loads((tmp_path / "out" / monitor.history_file).read_text())["history"]
    assert [h["step"] for h in saved] == [0, 2, 4, 5]
