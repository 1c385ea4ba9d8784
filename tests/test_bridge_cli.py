"""`dipreg bridge` end to end on the real default model (4 vignettes, one operator, one intervention), and clear
errors on bad input before any model is loaded."""

import json

import pytest
from conftest import assert_png_of, saved_figures

from dipreg.cli import main
from dipreg.eval import state_checksum
from dipreg.eval.readouts import bridge


@pytest.mark.integration
def test_bridge_end_to_end_writes_json_figure_and_leaves_the_model_intact(tmp_path, default_model, monkeypatch):
    model, _tok = default_model
    checksum = state_checksum(model)
    out = tmp_path / "bridge"
    args = ["bridge", "--limit", "4", "--readouts", "label,semantic,constrained,free", "--ops", "deprive:alpha=0"]
    args += ["--interventions", "synonym", "--max-new-tokens", "4", "--out", str(out)]
    figures = saved_figures(monkeypatch, bridge)
    assert main(args) == 0
    payload = json.loads((out / "bridge.json").read_text())
    assert payload["num_vignettes"] == 4 and payload["num_layers"] == 30 and payload["prompt"] == "chat"
    assert payload["restored_checksum_verified"] is True and payload["intact"]["checksum"] == checksum
    intact = payload["intact"]["items"]
    assert sorted(intact["answer_a"]) == [0, 0, 1, 1]  # the balanced subset keeps the A/B counterbalancing
    assert all(len(d) == 30 for d in intact["semantic_did"]) and min(intact["semantic_dip"]) >= 0
    clean = payload["clean"]
    assert list(clean) == ["label", "semantic", "constrained", "free"]
    assert clean["semantic"]["items"]["did"] == pytest.approx([d[-1] for d in intact["semantic_did"]], abs=1e-5)
    assert clean["label"]["items"]["did"] == pytest.approx([d[-1] for d in intact["label_did"]], abs=1e-5)
    assert len(clean["free"]["items"]["text_a"]) == 4
    conditions = [*payload["operators"].values(), *payload["interventions_results"].values()]
    assert list(payload["operators"]) == ["deprive:alpha=0"] and list(payload["interventions_results"]) == ["synonym"]
    for condition in conditions:
        for name, result in condition["readouts"].items():
            before, after = clean[name]["items"]["correct"], result["items"]["correct"]
            flips = [b and not a for b, a in zip(before, after, strict=True)]
            assert result["items"]["flip"] == flips and result["n_flips"] == sum(flips)
            assert result["n_at_risk"] == sum(before)
            assert result["accuracy"] == pytest.approx(sum(after) / 4)
            assert set(result["stratification"]) == {"semantic_dip", "label_dip", "semantic_margin"}
    assert payload["operators"]["deprive:alpha=0"]["operator"]["layers"] == [25, 26, 27, 28, 29]
    # bridge.png panel (a): per readout a pair-accuracy bar, then per readout a strict-accuracy bar, from the JSON
    clean_panel = figures["bridge.png"].axes[0]
    heights = [bar.get_height() for bar in clean_panel.patches]
    want = [clean[r]["accuracy"] for r in clean] + [clean[r]["strict_accuracy"] for r in clean]
    assert heights == pytest.approx(want)
    assert_png_of(out / "bridge.png", figures["bridge.png"])
    assert state_checksum(model) == checksum  # the session's shared model was never changed


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--readouts", "semantic,vibes"], "vibes"),
        (["--ops", "late_svd:rank=64,prune"], "known operators"),
        (["--interventions", "rephrase"], "rephrase"),
        (["--pairs", "fables"], "fables"),
        (["--readouts", "judge"], "--judge"),
    ],
)
def test_bad_input_fails_with_a_clear_error_before_the_model_is_loaded(tmp_path, capsys, monkeypatch, flags, message):
    def no_model(*_args, **_kwargs):
        raise AssertionError("the model must not be loaded on bad input")

    monkeypatch.setattr("dipreg.eval.readouts.bridge.load_model", no_model)
    assert main(["bridge", *flags, "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
