"""`dipreg ladder` on tiny saved models: the paired t, the accuracy check, the figure and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as sps

from dipreg.cli import main
from dipreg.eval.ladder import parse_ladder, run_ladder, verdict
from dipreg.stimuli.jsonl import save_pairs
from tests.conftest import make_tiny_model


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


def test_ladder_pairs_items_and_matches_scipy(saved_models, tmp_path):
    paths, pairs_file = saved_models
    spec = f"{paths['base']}:{paths['instruct']}"
    payload = run_ladder(spec, pairs_file, tmp_path / "out", batch_size=2)
    saved = json.loads((tmp_path / "out" / "ladder.json").read_text())
    assert (tmp_path / "out" / "ladder.png").stat().st_size > 0
    row = saved["ladder"][0]
    base = np.array(saved["models"][paths["base"]]["causal_dip"])
    inst = np.array(saved["models"][paths["instruct"]]["causal_dip"])
    assert len(base) == len(inst) == 4
    assert row["delta_causal_dip"] == pytest.approx(float((inst - base).mean()))
    expected = sps.ttest_rel(inst, base)
    assert row["paired_t"] == pytest.approx(float(expected.statistic))
    assert row["p"] == pytest.approx(float(expected.pvalue))
    accs = (row["base_accuracy"], row["instruct_accuracy"])
    assert row["accuracy_matched"] == (abs(accs[0] - accs[1]) <= 0.05)
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
