"""DipTracker in a plain PyTorch loop (no Lightning Trainer): a tiny LoRA model trained by hand, probed at the steps
the tracker says, each reading equal to ``dipreg.trajectories`` of the live weights at that step."""

from __future__ import annotations

import json
import math
import runpy
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch
from conftest import make_tiny_model
from peft import LoraConfig, get_peft_model
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

import dipreg
from dipreg.agreement import item_agreement
from dipreg.callbacks import DipTracker, MonitorSetupError

KEY_LOGIT = "dip/logit/max_wrong_dip"


def reference(model, tokenizer, pairs, lenses) -> dict[str, float]:
    """What a probe of every item under ``lenses`` must give, from ``dipreg.trajectories`` itself."""
    out = {}
    measured = {lens: dipreg.trajectories(model, tokenizer, pairs, lens, prompt="raw") for lens in lenses}
    for lens, traj in measured.items():
        out[f"dip/{lens}/accuracy"] = traj.correct.double().mean().item()
        out[f"dip/{lens}/max_wrong_dip"] = traj.max_wrong_dip.double().mean().item()
        out[f"dip/{lens}/commit_layer_frac"] = traj.commit_layer_frac.double().mean().item()
        negation = [i for i, p in enumerate(pairs) if p.family == "negation"]
        out[f"dip/{lens}/family/negation/max_wrong_dip"] = traj.max_wrong_dip[negation].double().mean().item()
    if {"logit", "causal"} <= set(lenses):
        rho, sign = item_agreement(measured["logit"].did, measured["causal"].did)
        for name, values in (("spearman", rho), ("sign", sign)):
            defined = [v for v in values if not math.isnan(v)]  # an item with a flat trajectory has no rank order
            out[f"dip/agreement/{name}"] = sum(defined) / len(defined)
    return out


def test_a_hand_written_loop_probes_on_its_steps_and_reads_the_live_weights(tmp_path, tiny_tokenizer, tiny_pairs):
    torch.manual_seed(0)
    model = get_peft_model(make_tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    received: list[tuple[int, dict[str, float]]] = []
    writer = SummaryWriter(tmp_path / "tb")
    tracker = DipTracker(
        tiny_pairs,
        tokenizer=tiny_tokenizer,
        lenses=("logit", "causal"),
        every_n_steps=2,
        causal_every=2,
        prompt="raw",
        sinks=[writer, lambda scalars, step: received.append((step, scalars))],
    )
    data = torch.randint(2, 40, (12, 2, 12), generator=torch.Generator().manual_seed(0))
    probed, expected = [], []
    model.train()
    for step, batch in enumerate(data[:5]):
        if tracker.due(step):
            reading = tracker.probe(model, step)
            probed.append(step)
            expected.append((reading, reference(model, tiny_tokenizer, tiny_pairs, tuple(reading.probe.local))))
            assert model.training  # the probe restored training mode
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    final = tracker.finish(model, 5, history_file=tmp_path / "dip_history.json")
    writer.close()
    assert final is not None
    expected.append((final, reference(model, tiny_tokenizer, tiny_pairs, ("logit", "causal"))))

    assert probed == [0, 2, 4] and tracker.steps == [0, 2, 4, 5]
    assert [sorted({k.split("/")[1] for k in r.scalars}) for r, _ in expected] == [
        ["agreement", "causal", "logit"],  # probe 0 reads the causal lens
        ["logit"],  # causal_every=2
        ["agreement", "causal", "logit"],
        ["agreement", "causal", "logit"],  # the final probe reads every lens
    ]
    for reading, ref in expected:
        for key, value in ref.items():
            assert reading.scalars[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (reading.step, key)
    first, last = expected[0][0].scalars, expected[-1][0].scalars
    assert abs(first["dip/logit/max_wrong_dip"] - last["dip/logit/max_wrong_dip"]) > 1e-3  # the weights moved
    assert [(step, scalars) for step, scalars in received] == [(r.step, r.scalars) for r, _ in expected]

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "scalars": 0, "histograms": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("dip/logit/max_wrong_dip")] == [0, 2, 4, 5]
    assert [e.step for e in events.Scalars("dip/causal/max_wrong_dip")] == [0, 4, 5]
    assert [e.step for e in events.Images("dip/trajectories")] == [0, 2, 4, 5]
    assert [e.step for e in events.Histograms("dip/logit/max_wrong_dip_items")] == [0, 2, 4, 5]
    figures = expected[-1][0].figures()
    assert set(figures) == {"dip/trajectories", "dip/history"}
    for fig in figures.values():
        plt.close(fig)


def test_the_history_survives_a_weights_only_checkpoint_and_the_resumed_tracker_goes_on(
    tmp_path, tiny_tokenizer, tiny_pairs
):
    model = make_tiny_model("llama")
    first = DipTracker(tiny_pairs, tokenizer=tiny_tokenizer, lenses=("logit",), every_n_steps=3, log_figures=False)
    for step in range(7):
        if first.due(step):
            first.probe(model, step)
    torch.save({"dip": first.state_dict()}, tmp_path / "ckpt.pt")
    second = DipTracker(tiny_pairs, tokenizer=tiny_tokenizer, lenses=("logit",), every_n_steps=3, log_figures=False)
    second.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True)["dip"])
    assert second.history == first.history and second.steps == [0, 3, 6] and second.last_step == 6
    assert [step for step in range(6, 13) if second.due(step)] == [9, 12]  # step 6 is not probed twice
    second.probe(model, 9)
    assert second.steps == [0, 3, 6, 9]
    assert second.latest() == {k: v for k, v in second.history[-1].items() if k != "step"}


def test_latest_keeps_the_last_value_of_a_lens_read_on_some_probes_only(tiny_tokenizer, tiny_pairs):
    tracker = DipTracker(tiny_pairs, tokenizer=tiny_tokenizer, lenses=("logit", "causal"), causal_every=2)
    model = make_tiny_model("llama")
    tracker.probe(model, 0)
    tracker.probe(model, 1)  # logit only
    assert "dip/causal/max_wrong_dip" not in tracker.history[1]
    assert tracker.latest()["dip/causal/max_wrong_dip"] == tracker.history[0]["dip/causal/max_wrong_dip"]
    assert tracker.latest()["dip/logit/accuracy"] == tracker.history[1]["dip/logit/accuracy"]


def test_bad_tracker_options_fail_at_construction_with_one_line(tiny_tokenizer, tiny_pairs):
    with pytest.raises(TypeError, match="Cannot log dips to a int: pass a TensorBoard SummaryWriter"):
        DipTracker(tiny_pairs, sinks=42)
    with pytest.raises(MonitorSetupError, match="every_n_steps must be a positive integer, got 0"):
        DipTracker(tiny_pairs, every_n_steps=0)
    with pytest.raises(MonitorSetupError, match="causal_every=2 leaves the probes in between with no lens"):
        DipTracker(tiny_pairs, lenses=("causal",), causal_every=2)


def test_without_a_tokenizer_the_first_probe_says_what_it_tried(tiny_pairs):
    tracker = DipTracker(tiny_pairs, lenses=("logit",))
    with pytest.raises(MonitorSetupError, match="DipTracker needs a tokenizer and found none"):
        tracker.probe(make_tiny_model("llama"), 0)


def test_importing_the_tracker_does_not_import_lightning(fresh_interpreter):
    """``from dipreg.callbacks import DipAlertRule, DipTracker`` (the any-loop API) in a fresh interpreter imports no
    Lightning (``tests/fresh_interpreter.py``, check ``any_loop``)."""
    assert fresh_interpreter["any_loop"] is None, fresh_interpreter["any_loop"]


def test_a_nan_reading_warns_once_and_keeps_nan(tiny_tokenizer, tiny_pairs):
    model = make_tiny_model("llama")
    with torch.no_grad():
        model.model.norm.weight.zero_()  # every residual reads as exactly 0: unreadable items
    tracker = DipTracker(tiny_pairs, tokenizer=tiny_tokenizer, lenses=("logit",))
    with pytest.warns(UserWarning, match="DipTracker at step 0: unreadable trajectories, logit: 0 non-finite, 4"):
        reading = tracker.probe(model, 0)
    assert math.isnan(reading.scalars["dip/logit/max_wrong_dip"])


EXAMPLE = Path(__file__).parent.parent / "docs" / "examples" / "own_loop.py"


def test_the_readme_shows_the_own_loop_example_verbatim():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("### Use it in your own loop", 1)[1]
    block = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert block == EXAMPLE.read_text()


def test_the_own_loop_example_runs_and_logs_every_probe(tmp_path, tiny_tokenizer, tiny_pairs, capsys):
    """The README's example, run as written with a tiny model, its tokenizer and pairs, and random batches."""
    example = runpy.run_path(str(EXAMPLE))  # defines main; the __main__ block (the default model) does not run
    batches = list(torch.randint(2, 40, (5, 2, 12), generator=torch.Generator().manual_seed(0)))
    tracker = example["main"](make_tiny_model("llama"), tiny_tokenizer, batches, tiny_pairs, str(tmp_path), 2)
    assert tracker.steps == [0, 2, 4, 5]
    assert [line.split(":")[0] for line in capsys.readouterr().out.splitlines()] == ["step 0", "step 2", "step 4"]
    history = json.loads((tmp_path / "dip_history.json").read_text())["history"]
    assert [h["step"] for h in history] == [0, 2, 4, 5]
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    logged = [e.value for e in events.Scalars("dip/causal/max_wrong_dip")]
    assert logged == pytest.approx([h["dip/causal/max_wrong_dip"] for h in history])


def test_a_fabric_loop_probes_its_wrapped_model_and_logs_to_fabric_loggers(tmp_path, tiny_tokenizer, tiny_pairs):
    """One process: the tracker finds the HF model inside Fabric's wrapper and writes to Fabric's loggers (a CSV
    logger has no image API: the figures become PNG files beside its metrics). The two-process case, where the
    tracker reads its rank from torch.distributed, runs in tests/sharded_run.py."""
    from lightning.fabric import Fabric
    from lightning.fabric.loggers import CSVLogger

    fabric = Fabric(accelerator="cpu", devices=1, loggers=[CSVLogger(tmp_path, name="fabric", version=0)])
    raw = make_tiny_model("llama")
    alone = DipTracker(tiny_pairs, tokenizer=tiny_tokenizer, lenses=("logit",)).probe(raw, 0).scalars
    model = fabric.setup_module(raw)
    tracker = DipTracker(tiny_pairs, tokenizer=tiny_tokenizer, lenses=("logit",), sinks=fabric.loggers)
    assert tracker.probe(model, 0).scalars == alone
    fabric.loggers[0].finalize("success")
    log_dir = tmp_path / "fabric" / "version_0"
    rows = (log_dir / "metrics.csv").read_text().splitlines()
    assert KEY_LOGIT in rows[0].split(",") and len(rows) == 2
    assert sorted(p.name for p in (log_dir / "dip" / "history").iterdir()) == ["step_000000.png"]
