"""DipAlertCallback (HF Trainer / TRL): takes the dip scalars logged at each probe, stops training where the rule says,
ignores the Trainer's other log entries, and keeps its state through transformers' stateful-callback protocol."""

from __future__ import annotations

import json

import pytest
from transformers import TrainerControl, TrainerState

from dipreg.callbacks.hf_alert import DipAlertCallback

#: (step, accuracy, dip) of the probes: saturated at step 0, best 0.5, then two probes more than 0.25 above it.
PROBES = [(0, 1.0, 0.5), (2, 1.0, 0.5), (4, 1.0, 1.0), (6, 1.0, 1.0), (8, 1.0, 1.0)]


def _log(callback: DipAlertCallback, state: TrainerState, logs: dict) -> TrainerControl:
    control = TrainerControl()
    callback.on_log(None, state, control, logs=logs)
    return control


def _feed(callback: DipAlertCallback, probes, state: TrainerState | None = None) -> list[int]:
    """The steps at which training was told to stop; a loss entry is logged at every step before its probe."""
    state = state or TrainerState()
    stops = []
    for step, accuracy, dip in probes:
        state.global_step = step
        assert not _log(callback, state, {"loss": 2.0, "learning_rate": 1e-3}).should_training_stop
        control = _log(callback, state, {"dip/causal/accuracy": accuracy, "dip/causal/max_wrong_dip": dip})
        if control.should_training_stop:
            stops.append(step)
    return stops


def test_stops_training_at_the_second_regressed_probe(caplog):
    callback = DipAlertCallback(("causal",), min_accuracy=0.9, max_rise=0.25, patience=2, action="stop")
    with caplog.at_level("WARNING"):
        assert _feed(callback, PROBES) == [6, 8]
    assert callback.stopped_step == 8 and [a.step for a in callback.alarms] == [6, 8]
    assert "DipAlertCallback: dip regression at step 6: dip/causal/max_wrong_dip = 1.0000" in caplog.text


def test_warn_action_never_stops():
    callback = DipAlertCallback(("causal",), min_accuracy=0.9, max_rise=0.25, patience=2, action="warn")
    assert _feed(callback, PROBES) == [] and [a.step for a in callback.alarms] == [6, 8]


def test_state_restored_by_transformers_or_at_train_begin_continues_as_one_run():
    kwargs = {"min_accuracy": 0.9, "max_rise": 0.25, "patience": 2, "action": "stop"}
    first = DipAlertCallback(("causal",), **kwargs)
    assert _feed(first, PROBES[:3]) == []
    saved = json.loads(json.dumps(first.state()))  # as trainer_state.json holds it
    rebuilt = DipAlertCallback.from_state(saved)  # what restore_callback_states_from_checkpoint=True does
    assert _feed(rebuilt, PROBES[3:]) == [6, 8]
    fresh = DipAlertCallback(("causal",), **kwargs)  # the flag off: the callback restores itself
    state = TrainerState(stateful_callbacks={"DipAlertCallback": saved})
    fresh.on_train_begin(None, state, TrainerControl())
    assert _feed(fresh, PROBES[3:], state) == [6, 8]
    other = DipAlertCallback(("causal",), **{**kwargs, "max_rise": 5.0})  # another alert's entry is not its own
    other.on_train_begin(None, state, TrainerControl())
    assert other.rule.last_step == -1


def test_bad_action_fails_at_construction():
    with pytest.raises(ValueError, match="DipAlertCallback: action must be 'warn' or 'stop', got 'halt'"):
        DipAlertCallback(action="halt")
