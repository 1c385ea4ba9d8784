"""DipAlertRule on hand-built probe sequences: saturation, the best dip, the tolerated rise, patience, resume."""

from __future__ import annotations

import math

import pytest

from dipreg.callbacks.alert import DipAlertRule


def probe(accuracy: float, dip: float, lens: str = "causal") -> dict[str, float]:
    return {f"dip/{lens}/accuracy": accuracy, f"dip/{lens}/max_wrong_dip": dip, f"dip/{lens}/commit_layer_frac": 0.5}


def feed(rule: DipAlertRule, probes: list[dict[str, float]], every: int = 10) -> list[list[int]]:
    """The steps of the alarms each probe raised (probe i at step i * every)."""
    return [[alarm.step for alarm in rule.update(i * every, p)] for i, p in enumerate(probes)]


def test_no_alarm_before_saturation_whatever_the_dip():
    rule = DipAlertRule(min_accuracy=0.95, max_rise=0.25, patience=1)
    assert feed(rule, [probe(0.5, 0.0), probe(0.9, 3.0), probe(0.94, 9.0)]) == [[], [], []]
    assert rule.saturated_step("causal") is None and rule.best("causal") is None


def test_accuracy_exactly_at_the_threshold_saturates():
    rule = DipAlertRule(min_accuracy=0.75, max_rise=0.25, patience=1)
    assert feed(rule, [probe(0.5, 0.0), probe(0.75, 0.5), probe(0.75, 1.0)]) == [[], [], [20]]
    assert rule.saturated_step("causal") == 10
    assert rule.best("causal") == (0.5, 10)


def test_a_rise_equal_to_max_rise_is_tolerated_and_one_just_above_is_not():
    at = DipAlertRule(min_accuracy=0.9, max_rise=0.25, patience=1)
    assert feed(at, [probe(1.0, 0.5), probe(1.0, 0.75)]) == [[], []]
    above = DipAlertRule(min_accuracy=0.9, max_rise=0.25, patience=1)
    assert feed(above, [probe(1.0, 0.5), probe(1.0, math.nextafter(0.75, 1.0))]) == [[], [10]]


def test_the_rise_is_measured_from_the_lowest_dip_since_saturation():
    rule = DipAlertRule(min_accuracy=0.9, max_rise=0.25, patience=1)
    # best falls to 0.25 at step 20; 0.6 is within 0.25 of the first best (0.5) but 0.35 above the new best
    steps = feed(rule, [probe(1.0, 0.5), probe(1.0, 0.4), probe(1.0, 0.25), probe(1.0, 0.6)])
    assert steps == [[], [], [], [30]]
    assert rule.best("causal") == (0.25, 20)


def test_patience_counts_regressed_probes_in_a_row_and_a_good_probe_resets_it():
    rule = DipAlertRule(min_accuracy=0.9, max_rise=0.25, patience=3)
    high, ok = probe(1.0, 1.0), probe(1.0, 0.5)
    steps = feed(rule, [probe(1.0, 0.5), high, high, ok, high, high, high, high])
    assert steps == [[], [], [], [], [], [], [60], [70]]


def test_the_alarm_names_the_step_the_lens_and_the_numbers():
    rule = DipAlertRule(min_accuracy=0.9, max_rise=0.25, patience=2)
    feed(rule, [probe(1.0, 0.5), probe(0.96, 1.0)])
    (alarm,) = rule.update(20, probe(0.97, 1.25))
    assert (alarm.lens, alarm.step, alarm.dip, alarm.best, alarm.best_step) == ("causal", 20, 1.25, 0.5, 0)
    assert alarm.rise == 0.75 and alarm.regressed == 2 and alarm.accuracy == 0.97
    message = alarm.message()
    assert "\n" not in message
    for part in ("step 20", "dip/causal/max_wrong_dip = 1.2500", "+0.7500", "0.5000 (step 0)", "max_rise=0.25"):
        assert part in message


def test_after_saturation_a_fall_in_accuracy_does_not_unsaturate():
    rule = DipAlertRule(min_accuracy=0.9, max_rise=0.25, patience=1)
    assert feed(rule, [probe(1.0, 0.5), probe(0.5, 1.0)]) == [[], [10]]


def test_a_non_finite_dip_after_saturation_regresses_and_never_becomes_the_best():
    rule = DipAlertRule(min_accuracy=0.9, max_rise=0.25, patience=1)
    assert feed(rule, [probe(1.0, 0.5), probe(1.0, math.nan)]) == [[], [10]]
    assert rule.best("causal") == (0.5, 0)
    unsaturated = DipAlertRule(min_accuracy=0.9, patience=1)
    feed(unsaturated, [probe(math.nan, 0.5), probe(1.0, math.nan)])
    assert unsaturated.saturated_step("causal") is None


def test_lenses_are_watched_separately_and_a_probe_without_a_lens_leaves_it_as_it_was():
    rule = DipAlertRule(("logit", "causal"), min_accuracy=0.9, max_rise=0.25, patience=2)
    both = {**probe(1.0, 0.5, "logit"), **probe(1.0, 0.5, "causal")}
    rule.update(0, both)
    rule.update(10, {**probe(1.0, 2.0, "logit"), **probe(1.0, 2.0, "causal")})
    rule.update(20, probe(1.0, 0.5, "logit"))  # causal not read (causal_every=2): its run of 1 regression stays
    alarms = rule.update(30, {**probe(1.0, 2.0, "logit"), **probe(1.0, 2.0, "causal")})
    assert [(a.lens, a.regressed) for a in alarms] == [("causal", 2)]


def test_a_step_taken_twice_is_ignored():
    rule = DipAlertRule(min_accuracy=0.9, max_rise=0.25, patience=2)
    high = probe(1.0, 1.0)
    assert feed(rule, [probe(1.0, 0.5), high]) == [[], []]
    assert rule.update(10, high) == [] and rule.update(5, high) == []
    assert [a.step for a in rule.update(20, high)] == [20]


def test_resume_mid_sequence_continues_as_one_run():
    sequence = [probe(0.5, 0.1), probe(1.0, 0.5), probe(1.0, 0.3), probe(1.0, 1.0), probe(1.0, 1.0), probe(1.0, 1.0)]
    whole = DipAlertRule(min_accuracy=0.9, max_rise=0.25, patience=2)
    expected = feed(whole, sequence)
    assert expected == [[], [], [], [], [40], [50]]
    first = DipAlertRule(min_accuracy=0.9, max_rise=0.25, patience=2)
    assert feed(first, sequence[:4]) == expected[:4]
    state = first.state_dict()
    resumed = DipAlertRule(min_accuracy=0.9, max_rise=0.25, patience=2)
    resumed.load_state_dict(state)
    assert [[a.step for a in resumed.update(i * 10, p)] for i, p in enumerate(sequence) if i >= 3] == [[], [40], [50]]
    assert resumed.state_dict() == whole.state_dict()


def test_state_holds_primitives_only():
    rule = DipAlertRule(("logit", "causal"), min_accuracy=0.9)
    feed(rule, [probe(1.0, 0.5)])
    state = rule.state_dict()
    assert state == {
        "last_step": 0,
        "lenses": {
            "logit": {"saturated_step": -1, "best": math.inf, "best_step": -1, "regressed": 0},
            "causal": {"saturated_step": 0, "best": 0.5, "best_step": 0, "regressed": 0},
        },
    }


def test_gated_dip_is_infinite_below_saturated_accuracy():
    rule = DipAlertRule(min_accuracy=0.9)
    assert rule.gated_dip("causal", probe(0.9, 0.5)) == 0.5
    assert rule.gated_dip("causal", probe(0.89, 0.1)) == math.inf
    assert rule.gated_dip("causal", probe(1.0, 0.5, "logit")) is None


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"lenses": "causal"}, "lenses must be a non-empty sequence"),
        ({"lenses": ()}, "lenses must be a non-empty sequence"),
        ({"lenses": ("causal", "causal")}, "lists a lens twice"),
        ({"min_accuracy": 1.5}, "min_accuracy must be a number in [0, 1], got 1.5"),
        ({"min_accuracy": 0}, "min_accuracy must be > 0"),
        ({"min_accuracy": True}, "min_accuracy must be a number"),
        ({"max_rise": -0.1}, "max_rise must be a number in [0, inf], got -0.1"),
        ({"max_rise": math.nan}, "max_rise must be a number"),
        ({"patience": 0}, "patience must be an integer >= 1"),
        ({"patience": 1.5}, "patience must be an integer >= 1"),
    ],
)
def test_bad_arguments_fail_at_construction_with_what_to_change(kwargs, words):
    with pytest.raises(ValueError, match="DipAlertRule: ") as err:
        DipAlertRule(**kwargs)
    assert words in str(err.value)
