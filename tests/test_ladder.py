"""`dipreg ladder` on tiny saved models: the paired t, the accuracy check, the figure and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats as sps

from dipreg.cli import main
from dipreg.eval import ladder
from dipreg.eval.ladder import parse_ladder, run_ladder, verdict
from dipreg.stimuli.jsonl import save_pairs
from tests.conftest import assert_png_of, make_tiny_model, saved_figures


@pytest.fixture
def saved_models(tmp_path, tiny_tokenizer, tiny_pairs):
    """Two tiny Llamas with different seeds saved with the tiny tokenizer (a stand-in base and instruct)."""
    paths = {}
    for name, seed in (("base", 0), ("instruct", 1)):
        path = tmp_path / name
        make_tiny_model("llama", seed=seed).save_pretrained(path)
        tiny_tokenizer.save_pretrained(path)
        paths[name] = str(path)
    pairs_file = tmp_path / "pairs.jsonl"
    save_pairs(tiny_pairs, pairs_file)
    return paths, str(pairs_file)


def test_parse_ladder_accepts_pairs_and_rejects_malformed_entries():
    assert parse_ladder("a:b, c:d") == [("a", "b"), ("c", "d")]
    for bad in ("a", "a:", ":b", "a:b:c", " , "):
        with pytest.raises(ValueError, match="BASE:INSTRUCT"):
            parse_ladder(bad)


def test_verdict_uses_sign_and_significance():
    assert verdict(0.1, 0.01) == "amplifies"
    assert verdict(-0.1, 0.01) == "reverses"
    assert verdict(0.3, 0.2) == "null"
    assert verdict(0.3, math.nan) == "null"


def test_ladder_pairs_items_and_matches_scipy(saved_models, tmp_path, monkeypatch):
    paths, pairs_file = saved_models
    spec = f"{paths['base']}:{paths['instruct']}"
    figures = saved_figures(monkeypatch, ladder)
    payload = run_ladder(spec, pairs_file, tmp_path / "out", batch_size=2)
    saved = json.loads((tmp_path / "out" / "ladder.json").read_text())
    # the figure plots the JSON's numbers: (a) one bar of Δ causal dip per pair, (b) Δ dip against commit depth
    bars, taxonomy = figures["ladder.png"].axes
    assert [bar.get_height() for bar in bars.patches] == pytest.approx([r["delta_causal_dip"] for r in saved["ladder"]])
    points = np.concatenate([c.get_offsets() for c in taxonomy.collections])
    expected = [[r["delta_causal_dip"], r["instruct_commit"]] for r in saved["ladder"]]
    np.testing.assert_allclose(points, expected, rtol=1e-6)
    assert_png_of(tmp_path / "out" / "ladder.png", figures["ladder.png"])
    row = saved["ladder"][0]
    base = np.array(saved["models"][paths["base"]]["causal_dip"])
    inst = np.array(saved["models"][paths["instruct"]]["causal_dip"])
    assert len(base) == len(inst) == 4
    assert row["delta_causal_dip"] == pytest.approx(float((inst - base).mean()))
    expected = sps.ttest_rel(inst, base)
    assert row["paired_t"] == pytest.approx(float(expected.statistic))
    assert row["p"] == pytest.approx(float(expected.pvalue))
    assert 0.0 <= row["instruct_w3_accuracy"] <= 1.0
    assert payload["ladder"][0]["verdict"] == saved["ladder"][0]["verdict"]


def test_ladder_cli_measures_a_shared_model_once_and_reports_bad_specs(saved_models, tmp_path, capsys):
    paths, pairs_file = saved_models
    spec = f"{paths['base']}:{paths['instruct']},{paths['base']}:{paths['base']}"
    out = tmp_path / "cli"
    assert main(["ladder", "--models", spec, "--pairs", pairs_file, "--out", str(out), "--no-w3"]) == 0
    saved = json.loads((out / "ladder.json").read_text())
    assert set(saved["models"]) == {paths["base"], paths["instruct"]}
    same = saved["ladder"][1]
    assert same["delta_causal_dip"] == 0.0 and same["verdict"] == "null"
    assert saved["ladder"][0]["instruct_w3_accuracy"] is None
    assert main(["ladder", "--models", "only-one-model", "--out", str(out)]) == 2
    assert "BASE:INSTRUCT" in capsys.readouterr().err


# -- the verdict on hand-built trajectories ------------------------------------------------------------------------
#
# Each stand-in model's causal trajectories are built by hand: item i has DiD(L) = +1 (correct) or -1 (wrong) and a
# wrong-side excursion of depth dip[i] >= 0 at relative depth 0.5 (layer 4 of 8), so its max_wrong_dip is dip[i]. The
# expected verdicts come from the paired t computed here in plain Python, compared with the two-sided 5 % critical
# value of Student's t with 5 degrees of freedom (2.571, from a printed table), never from scipy or dipreg.

T_CRIT_DF5 = 2.571
BASE_DIPS = [0.10, 0.20, 0.30, 0.40, 0.50, 0.60]


def _shift(deltas, sign):
    return [d + sign * e for d, e in zip(BASE_DIPS, deltas, strict=True)]


HAND_BUILT = {
    "base": (BASE_DIPS, [True, True, True, True, False, False]),  # accuracy 4/6
    "amplified": (_shift([0.30, 0.32, 0.28, 0.31, 0.29, 0.30], +1), [True] * 4 + [False] * 2),
    "reversed": (_shift([0.05, 0.07, 0.06, 0.04, 0.05, 0.06], -1), [True] * 5 + [False]),
    "noisy": (_shift([0.30, -0.08, 0.25, -0.22, 0.31, -0.26], +1), [True] * 4 + [False] * 2),
}


def _hand_trajectories(pairs, dips, correct):
    """Trajectories whose causal max_wrong_dip is ``dips[i]`` and whose output is right iff ``correct[i]``."""
    from dipreg.trajectory import Trajectories

    margin_a, margin_b = [], []
    for dip, ok in zip(dips, correct, strict=True):
        sign = 1.0 if ok else -1.0
        did = [sign * 0.5] * 8
        did[3] = -sign * dip  # layer 4 of 8: relative depth 0.5, inside the default window
        did[-1] = sign * 1.0
        margin_a.append([d / 2 for d in did])
        margin_b.append([-d / 2 for d in did])
    return Trajectories(pairs, "causal", torch.tensor(margin_a), torch.tensor(margin_b))


def _paired_t(x, y):
    diffs = [a - b for a, b in zip(x, y, strict=True)]
    mean = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
    return mean, mean / (sd / math.sqrt(len(diffs)))


def test_ladder_verdicts_on_hand_built_trajectories(tmp_path, monkeypatch):
    from dipreg.eval import ladder
    from dipreg.stimuli import MinimalPair

    pairs = [
        MinimalPair(f"p{i}", f"is it good {i} ?", f"is it bad {i} ?", " Yes", " No", "value_flip", False)
        for i in range(6)
    ]
    pairs_file = save_pairs(pairs, tmp_path / "pairs.jsonl")
    monkeypatch.setattr(ladder, "load_model", lambda name: (name, None))

    def by_lens(model, tokenizer, items, lenses, **kwargs):
        dips, correct = HAND_BUILT[model]
        traj = _hand_trajectories(list(items), dips, correct)
        return {"logit": traj, "causal": traj}

    monkeypatch.setattr(ladder, "trajectories_by_lens", by_lens)
    spec = "base:amplified,base:reversed,base:noisy"
    rows = {r["instruct"]: r for r in run_ladder(spec, str(pairs_file), tmp_path / "out", w3=False)["ladder"]}
    for name, expected_verdict in (("amplified", "amplifies"), ("reversed", "reverses"), ("noisy", "null")):
        mean, t = _paired_t(HAND_BUILT[name][0], BASE_DIPS)
        hand = "null" if abs(t) < T_CRIT_DF5 else ("amplifies" if mean > 0 else "reverses")
        assert hand == expected_verdict, "the hand-built fixture no longer gives the verdict it was built for"
        assert rows[name]["verdict"] == expected_verdict, name
        assert rows[name]["delta_causal_dip"] == pytest.approx(mean, abs=1e-6)
        assert rows[name]["paired_t"] == pytest.approx(t, rel=1e-4)
    # accuracy: base 4/6; amplified and noisy 4/6 (matched), reversed 5/6 (0.167 apart: not matched)
    assert [rows[n]["accuracy_matched"] for n in ("amplified", "reversed", "noisy")] == [True, False, True]
    assert rows["reversed"]["instruct_accuracy"] == pytest.approx(5 / 6)
