"""`dipreg degrade` end to end on the real default model (a 20-pair subset of core, two operators)."""

import dataclasses
import json
import math

import pytest
from conftest import assert_png_of, saved_figures

from dipreg.cli import main
from dipreg.eval import state_checksum
from dipreg.eval.degradation import report as degrade_report
from dipreg.stimuli import load_pairs


@pytest.mark.integration
def test_degrade_end_to_end_writes_json_figure_and_leaves_the_model_intact(tmp_path, default_model, monkeypatch):
    pairs = load_pairs("core")[::14][:20]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(dataclasses.asdict(p)) + "\n" for p in pairs))
    model, _tok = default_model
    checksum = state_checksum(model)
    out = tmp_path / "degrade"
    figures = saved_figures(monkeypatch, degrade_report)
    assert main(["degrade", "--pairs", str(path), "--ops", "late_drop,rtn:bits=3", "--out", str(out)]) == 0
    payload = json.loads((out / "degrade.json").read_text())
    assert payload["num_pairs"] == 20 and payload["num_layers"] == 30
    assert payload["restored_checksum_verified"] is True
    intact = payload["intact"]["items"]
    assert intact["id"] == [p.id for p in pairs]
    assert list(payload["operators"]) == ["late_drop", "rtn:bits=3"]
    drop = payload["operators"]["late_drop"]
    assert drop["operator"]["layers"] == [26, 27, 28, 29]
    for result in payload["operators"].values():
        correct = result["items"]["correct"]
        assert result["accuracy"] == pytest.approx(sum(correct) / 20)
        flips = [a and not b for a, b in zip(intact["correct"], correct, strict=True)]
        assert result["items"]["flip"] == flips and result["n_flips"] == sum(flips)
        for predictor in ("dip", "margin"):
            strat = result["stratification"][predictor]
            assert strat["n_at_risk"] == sum(intact["correct"]) and strat["n_flips"] == sum(flips)
    rtn = payload["operators"]["rtn:bits=3"]["operator"]
    assert rtn["backup_bytes"] > 0 and rtn["details"]["matrices"] == 30 * 7
    # tertile_flips.png: per operator a low-dip and a high-dip bar, the JSON's tertile flip rates (NaN drawn as 0)
    (ax,) = figures["tertile_flips.png"].axes
    heights = [bar.get_height() for bar in ax.patches]
    for predictor_side, offset in (("low_tertile_flip_rate", 0), ("high_tertile_flip_rate", 2)):
        want = [payload["operators"][op]["stratification"]["dip"][predictor_side] for op in payload["operators"]]
        assert heights[offset : offset + 2] == pytest.approx([0.0 if math.isnan(w) else w for w in want])
    assert_png_of(out / "tertile_flips.png", figures["tertile_flips.png"])
    assert state_checksum(model) == checksum  # the session's shared model was never changed


def test_bad_ops_fail_before_the_model_is_loaded(tmp_path, capsys):
    assert main(["degrade", "--ops", "late_svd:rank=64,prune", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "prune" in err and "known operators" in err
