"""The `dipreg` console script: audit end to end on the real default model, and clear errors on bad input."""

import json

import pytest

from dipreg.cli import main


@pytest.mark.integration
def test_audit_end_to_end_writes_json_and_figure(tmp_path, default_model):
    out = tmp_path / "audit"
    assert main(["audit", "--pairs", "core", "--out", str(out)]) == 0
    payload = json.loads((out / "audit.json").read_text())
    assert payload["num_pairs"] == 278 and payload["num_layers"] == 30
    assert payload["prompt"] == "chat"
    items = payload["items"]
    assert len(items) == 278
    assert all(len(it["did"]) == 30 and len(it["margin_a"]) == 30 for it in items)
    assert {it["family"] for it in items} == {"value_flip", "negation", "permission"}
    summary = payload["summary"]
    assert summary["all"]["accuracy"] == pytest.approx(sum(it["correct"] for it in items) / 278)
    assert summary["all"]["mean_max_wrong_dip"] == pytest.approx(sum(it["max_wrong_dip"] for it in items) / 278)
    assert summary["families"]["negation"]["n"] == 48
    assert summary["safety"]["n"] == sum(it["safety"] for it in items) > 0
    assert (out / "trajectories.png").stat().st_size > 10_000


def test_missing_pairs_file_is_reported_with_its_name(tmp_path, capsys):
    code = main(["audit", "--pairs", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "nope.jsonl" in capsys.readouterr().err


def test_multi_token_candidate_in_a_pairs_file_is_named(tmp_path, capsys, default_model):
    path = tmp_path / "pairs.jsonl"
    row = {
        "id": "bad-1",
        "ctx_a": "Is ice cold? Answer:",
        "ctx_b": "Is ice not cold? Answer:",
        "t_pos": " hippopotamus",
        "t_neg": " No",
        "family": "negation",
        "safety": False,
    }
    path.write_text(json.dumps(row) + "\n")
    assert main(["audit", "--pairs", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "bad-1" in err and "hippopotamus" in err


def test_bad_window_is_rejected_by_the_parser(tmp_path):
    with pytest.raises(SystemExit):
        main(["audit", "--window", "0.5", "--out", str(tmp_path)])


def test_every_documented_command_is_registered():
    from dipreg.cli import build_parser

    choices = build_parser()._subparsers._group_actions[0].choices  # the sub-command action
    documented = {"audit", "bench", "bridge", "degrade", "fit"}
    assert documented <= set(choices)
