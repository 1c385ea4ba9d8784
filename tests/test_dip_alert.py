"""DipAlert in real tiny Lightning fits (tests/dip_alert_run.py): it stops a fit whose dip was made to regress after
accuracy saturated and not a healthy one, in one process and under two-process DDP (both ranks at the same step),
and a resumed fit stops where the uninterrupted one did."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import dip_alert_run as run
import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from sharded_run import PAIRS

from dipreg.callbacks import DipAlert, DipMonitor, MonitorSetupError
from dipreg.callbacks.dip_alert import saturated_key


def expected_alarm_step(history: list[dict], lens: str) -> int | None:
    """The first probe at which the last ``PATIENCE`` probes all rose more than ``max_rise`` above the lowest dip
    since the first probe with accuracy >= ``min_accuracy``, recomputed from the monitor's history."""
    best, run_length = None, 0
    for entry in history:
        accuracy, dip = entry[f"dip/{lens}/accuracy"], entry[f"dip/{lens}/max_wrong_dip"]
        if best is None:
            best = dip if accuracy >= run.ALERT["min_accuracy"] else None
            continue
        best = min(best, dip)
        run_length = run_length + 1 if dip - best > run.ALERT["max_rise"] else 0
        if run_length >= run.PATIENCE:
            return int(entry["step"])
    return None


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    return run.fit(tmp_path_factory.mktemp("planted"))


def test_the_planted_fault_raises_the_logit_dip_while_accuracy_stays_saturated(planted):
    history = planted["history"]
    after = [h for h in history if h["step"] >= run.PLANT_START]
    assert all(h["dip/logit/accuracy"] == 1.0 for h in history if h["step"] >= 2)
    before = min(h["dip/logit/max_wrong_dip"] for h in history if 2 <= h["step"] < run.PLANT_START)
    assert after[-1]["dip/logit/max_wrong_dip"] > before + 1.0


def test_alert_stops_the_fit_at_the_probe_the_rule_names(planted):
    step = expected_alarm_step(planted["history"], "logit")
    assert step is not None and step < run.MAX_STEPS
    assert planted["stopped_step"] == planted["global_step"] == step
    assert planted["alarm_steps"] == [step] and planted["alarm_lenses"] == ["logit"]  # the causal dip did not rise
    assert expected_alarm_step(planted["history"], "causal") is None
    dip = planted["history"][-1]["dip/logit/max_wrong_dip"]
    assert f"at step {step}: dip/logit/max_wrong_dip = {dip:.4f}" in planted["alarms"][0]


def test_alert_lets_a_healthy_fit_run_to_its_last_step(tmp_path):
    healthy = run.fit(tmp_path, planted=False)
    assert healthy["global_step"] == run.MAX_STEPS and healthy["stopped_step"] == -1
    assert healthy["alarms"] == [] and expected_alarm_step(healthy["history"], "logit") is None
    # The rule was armed: both lenses saturated, so the silence is a verdict, not a rule that never started.
    assert all(state["saturated_step"] >= 0 for state in healthy["alert_state"]["rule"]["lenses"].values())


def test_warn_action_warns_at_every_regressed_probe_and_keeps_training(tmp_path, planted):
    with pytest.warns(UserWarning, match=r"DipAlert: dip regression at step \d+") as caught:
        warned = run.fit(tmp_path, action="warn")
    first = planted["global_step"]
    assert warned["global_step"] == run.MAX_STEPS and warned["stopped_step"] == -1
    assert warned["alarm_steps"] == list(range(first, run.MAX_STEPS + 1, run.EVERY_N_STEPS))
    lines = [str(w.message) for w in caught if "DipAlert" in str(w.message)]
    assert len(lines) == len(warned["alarm_steps"]) and all("\n" not in line for line in lines)


def test_a_fit_resumed_between_two_regressed_probes_stops_where_the_uninterrupted_one_did(tmp_path, planted):
    stop = planted["global_step"]
    every = run.EVERY_N_STEPS
    keep = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every, save_top_k=-1)
    first = run.fit(tmp_path / "first", max_steps=stop - every, callbacks=(keep,))
    assert first["stopped_step"] == -1 and first["alert_state"]["rule"]["lenses"]["logit"]["regressed"] == 1
    (checkpoint,) = (tmp_path / "ckpt").glob(f"*step={stop - every}.ckpt")
    resumed = run.fit(tmp_path / "resumed", ckpt_path=str(checkpoint))
    assert resumed["stopped_step"] == resumed["global_step"] == stop
    assert resumed["alarms"] == planted["alarms"]
    assert resumed["alert_state"] == planted["alert_state"]


def test_two_ddp_ranks_stop_together_at_the_step_one_process_stops(alert_ranks, planted):
    records = {name: [json.loads((alert_ranks / name / f"rank{r}.json").read_text()) for r in (0, 1)]
               for name in run.FITS}  # fmt: skip
    for rank in records["planted"]:
        assert rank["stopped_step"] == rank["global_step"] == planted["global_step"]
        assert rank["alarms"] == planted["alarms"]
        assert [h["step"] for h in rank["history"]] == [h["step"] for h in planted["history"]]
        for single, double in zip(planted["history"], rank["history"], strict=True):  # the same fit, summed in
            assert double == pytest.approx(single, abs=1e-3, nan_ok=True)  # another order: rounding grows with steps
    for rank in records["healthy"]:
        assert rank["global_step"] == run.MAX_STEPS and rank["alarms"] == []
    # Rank 0 waits for 2 regressed probes, rank 1 for 3: rank 1 stops with rank 0, without an alarm of its own.
    zero, one = records["split"]
    assert zero["alarm_steps"] == [planted["global_step"]] and one["alarm_steps"] == []
    assert zero["global_step"] == one["global_step"] == planted["global_step"]
    assert zero["stopped_step"] == one["stopped_step"] == planted["global_step"]


def _probe_scalars(accuracy: float, dip: float) -> dict[str, torch.Tensor]:
    return {"dip/causal/accuracy": torch.tensor(accuracy), "dip/causal/max_wrong_dip": torch.tensor(dip)}


def _probed(alert: DipAlert, trainer: SimpleNamespace, step: int, scalars: dict[str, torch.Tensor]) -> None:
    """What DipMonitor does at a probe (history entry, scalars into callback_metrics), then the alert's check."""
    alert._monitor.last_step = step
    alert._monitor.history.append({"step": float(step), **{k: float(v) for k, v in scalars.items()}})
    trainer.callback_metrics.update(scalars)
    alert._check(trainer)


def _fake_fit() -> SimpleNamespace:
    return SimpleNamespace(callback_metrics={}, strategy=None, should_stop=False)


def test_the_gated_dip_is_published_and_infinite_below_saturated_accuracy():
    alert, trainer = DipAlert(("causal",), min_accuracy=0.9), _fake_fit()
    alert._monitor = SimpleNamespace(last_step=-1, history=[])
    _probed(alert, trainer, 0, _probe_scalars(0.5, 0.25))
    assert math.isinf(float(trainer.callback_metrics[saturated_key("causal")]))
    _probed(alert, trainer, 15, _probe_scalars(0.95, 0.5))
    assert float(trainer.callback_metrics[saturated_key("causal")]) == 0.5


def test_a_probe_that_skipped_a_lens_is_not_read_from_its_stale_metrics():
    alert, trainer = DipAlert(("causal",), min_accuracy=0.9, max_rise=0.1, patience=1), _fake_fit()
    alert._monitor = SimpleNamespace(last_step=-1, history=[])
    _probed(alert, trainer, 0, _probe_scalars(1.0, 0.0))
    _probed(alert, trainer, 15, _probe_scalars(1.0, 0.5))  # regressed: an alarm at 15
    logit_only = {"dip/logit/accuracy": torch.tensor(1.0), "dip/logit/max_wrong_dip": torch.tensor(0.0)}
    _probed(alert, trainer, 30, logit_only)  # causal_every=2: the causal values in callback_metrics are step 15's
    assert [alarm.step for alarm in alert.alarms] == [15]


def _trainer(callbacks: list) -> pl.Trainer:
    return pl.Trainer(callbacks=callbacks, logger=False, accelerator="cpu", enable_progress_bar=False)


def test_setup_fails_before_step_one_without_a_monitor_that_reads_the_lenses():
    alert = DipAlert(("causal",))
    with pytest.raises(MonitorSetupError, match="DipAlert watches lenses \\('causal',\\) but the Trainer has no Dip"):
        alert.setup(_trainer([alert]), None, "fit")
    logit_only = DipMonitor(PAIRS, lenses=("logit",))
    with pytest.raises(MonitorSetupError, match=r"DipMonitor\(lenses=\('logit',\)\); add a DipMonitor"):
        alert.setup(_trainer([logit_only, alert]), None, "fit")


def test_setup_fails_when_the_alert_comes_before_its_monitor():
    alert, monitor = DipAlert(("causal",)), DipMonitor(PAIRS, lenses=("logit", "causal"))
    with pytest.raises(MonitorSetupError, match="must come after the DipMonitor it watches"):
        alert.setup(_trainer([alert, monitor]), None, "fit")
    alert.setup(_trainer([monitor, alert]), None, "fit")


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"action": "raise"}, "DipAlert: action must be 'warn' or 'stop', got 'raise'"),
        ({"max_rise": -1}, "DipAlertRule: max_rise must be a number in [0, inf], got -1"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, words):
    with pytest.raises(ValueError) as err:
        DipAlert(**kwargs)
    assert words in str(err.value)


def test_state_key_tells_two_alerts_apart():
    assert DipAlert(("causal",)).state_key != DipAlert(("logit",)).state_key
    assert DipAlert(max_rise=0.1).state_key != DipAlert(max_rise=0.2).state_key
