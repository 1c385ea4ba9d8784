"""`dipreg arms`: recipe lookup, arm expansion, an arm built through the `dipreg fit` LightningCLI (every recipe
setting reaches it), the per-seed statistics, and a real --quick run on the default model whose report is checked
against the numbers read back from arms.json; a second invocation resumes without retraining."""

from __future__ import annotations

import json
import math

import lightning.pytorch.cli as lightning_cli
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dipreg.cli import main
from dipreg.eval.arms.plan import ArmSpec, ArmsSettings, build_arms
from dipreg.eval.arms.report import _ms
from dipreg.eval.arms.stats import mean_sd, per_seed_mcnemar
from dipreg.eval.arms.train import RECIPE_FILE, build_arm_run
from dipreg.heldout import HeldOutEval
from dipreg.losses import WrongMarginHinge
from dipreg.recipes import RECIPES, load_recipe, recipe_path
from tests.conftest import make_tiny_model

ARMS = ("output_only", "late_only", "dip_reg_l0.2")


def test_build_arms_expands_lambdas_and_rejects_unknown_names():
    specs = build_arms(["output_only", "dip_reg"], [0.05, 0.5])
    assert [s.name for s in specs] == ["output_only", "dip_reg_l0.05", "dip_reg_l0.5"]
    hinge = specs[2].recipe_config()["model"]["aux_losses"][0]
    assert hinge["init_args"]["weight"] == 0.5
    assert specs[0].recipe_config()["model"]["aux_losses"] == []
    with pytest.raises(ValueError, match="Unknown arm"):
        build_arms(["sft"], [0.2])
    with pytest.raises(ValueError, match="λ must be > 0"):
        build_arms(["dip_reg"], [0.0])


def test_recipes_resolve_packaged_names_and_yaml_paths(tmp_path):
    assert "dip_reg" in RECIPES and recipe_path("dip_reg").name == "dip_reg.yaml"
    custom = tmp_path / "mine.yaml"
    custom.write_text(recipe_path("late_only").read_text())
    assert recipe_path(str(custom)) == custom
    assert load_recipe(custom) == load_recipe("late_only")
    assert ArmSpec("mine", str(custom)).recipe_config()["model"]["layers"] == 0.25
    with pytest.raises(ValueError, match=r"Unknown recipe 'nope'.*output_only"):
        recipe_path("nope")
    with pytest.raises(FileNotFoundError, match=r"missing\.yaml"):
        recipe_path(str(tmp_path / "missing.yaml"))


def test_an_arm_gets_every_recipe_setting_through_the_fit_cli(tmp_path, tiny_tokenizer, monkeypatch):
    model_dir = tmp_path / "tiny-llama"
    make_tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    text = recipe_path("dip_reg").read_text()
    text = text.replace("seed_everything: 0", "seed_everything: 123")
    text = text.replace("trainer:\n", "trainer:\n  gradient_clip_val: 0.5\n").replace(
        "log_every_n_steps: 5", "log_every_n_steps: 3"
    )
    recipe = tmp_path / "clipped.yaml"
    recipe.write_text(text)
    seeds: list[int] = []
    seed_everything = lightning_cli.seed_everything

    def record_seed(seed=None, **kwargs):
        seeds.append(seed)
        return seed_everything(seed, **kwargs)

    monkeypatch.setattr(lightning_cli, "seed_everything", record_seed)

    run_dir = tmp_path / "run"
    run = build_arm_run(ArmSpec("clipped", str(recipe), 0.3), 7, ArmsSettings.quick(), run_dir, str(model_dir))
    assert seeds == [7]  # the arm's seed overrides the recipe's seed_everything (123)
    trainer = run.trainer
    assert trainer.gradient_clip_val == 0.5 and trainer.log_every_n_steps == 3  # from the recipe
    assert trainer.max_steps == ArmsSettings.quick().max_steps and run.data.batch_size == 8  # from the settings
    assert [h.weight for h in run.module.aux_losses if isinstance(h, WrongMarginHinge)] == [0.3]  # the arm's λ
    assert trainer.checkpoint_callback is None and trainer.progress_bar_callback is None
    (heldout,) = [c for c in trainer.callbacks if isinstance(c, HeldOutEval)]
    assert heldout.sets == ["comp_strict"]  # --quick keeps the recipe's held-out eval small
    assert run.monitor in trainer.callbacks and run.retention in trainer.callbacks
    assert trainer.log_dir.rstrip("/") == str(run_dir / "tb")  # adapter, dip_history.json, heldout.json
    saved = yaml.safe_load((run_dir / RECIPE_FILE).read_text())
    assert (
        saved["trainer"]["gradient_clip_val"] == 0.5 and saved["model"]["aux_losses"][0]["init_args"]["weight"] == 0.3
    )


def test_mean_sd_skips_missing_values():
    cell = mean_sd([1.0, None, 3.0, math.nan])
    assert cell["mean"] == 2.0 and cell["n"] == 2 and cell["sd"] == pytest.approx(math.sqrt(2))
    assert math.isnan(mean_sd([0.5])["sd"])


def _run(arm, seed, correct):
    return {"arm": arm, "seed": seed, "eval": {"conditions": {"c": {"correct": correct}}}}


def test_mcnemar_is_per_seed_never_pooled():
    runs = [
        _run("output_only", 0, [False] * 6 + [True] * 4),
        _run("dip_reg", 0, [True] * 10),
        _run("output_only", 1, [True] * 10),
        _run("dip_reg", 1, [True] * 9 + [False]),
    ]
    tests = per_seed_mcnemar(runs, "c")["dip_reg"]
    assert [(t["seed"], t["b"], t["c"]) for t in tests] == [(0, 6, 0), (1, 0, 1)]
    assert tests[0]["p"] == pytest.approx(2 * 0.5**6)  # exact binomial, two-sided
    assert tests[1]["p"] == pytest.approx(1.0)


def test_quick_settings_are_smaller_than_the_default():
    quick, full = ArmsSettings.quick(), ArmsSettings()
    assert quick.max_steps < 50 and full.max_steps is None
    assert quick.conditions == full.conditions  # every degradation is still exercised


@pytest.mark.integration
def test_quick_arms_run_reports_every_arm_from_arms_json_and_resumes(tmp_path, capsys):
    out = tmp_path / "arms"
    assert main(["arms", "--quick", "--seeds", "0,1", "--out", str(out)]) == 0
    result = json.loads((out / "arms.json").read_text())
    tables = result["tables"]
    assert [row["arm"] for row in tables["table3"]] == ["untrained", *ARMS]
    assert [row["arm"] for row in tables["table5"]] == ["untrained", *ARMS]
    conditions = [row["condition"] for row in tables["table4"]]
    assert conditions[0] == "clean" and "mid_svd:rank=64" in conditions and "rtn:bits=3" in conditions
    report = (out / "report.md").read_text()
    for row in tables["table3"]:
        cells = [_ms(row[k]) for k in ("accuracy", "dip", "commit", "fragility", "nll", "retention")]
        assert "| " + " | ".join([row["arm"], *cells]) + " |" in report
    for row in tables["table4"]:
        assert set(row["arms"]) == set(ARMS)
        for arm in ("late_only", "dip_reg_l0.2"):
            tests = row["mcnemar_vs_output_only"][arm]
            assert [t["seed"] for t in tests] == [0, 1]
            # Table 4b: one line per condition x arm, one cell per seed with that seed's discordant counts.
            [line] = [ln for ln in report.splitlines() if ln.startswith(f"| {row['condition']} | {arm} |")]
            cells = [c.strip() for c in line.strip("|").split("|")][2:]
            assert [c.split(" ")[1] for c in cells] == [f"({t['b']}:{t['c']})" for t in tests]
    assert len(tables["forecast"]["runs"]) == 6
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "Table 4" in html
    for arm in ARMS:
        for seed in (0, 1):
            run = out / "runs" / arm / f"seed{seed}"
            assert (run / "tb" / "adapter" / "adapter_model.safetensors").is_file()
            events = EventAccumulator(str(run / "tb")).Reload()
            assert "dip/causal/max_wrong_dip" in events.Tags()["scalars"]
            assert "retention/mid_svd:rank=64/accuracy" in events.Tags()["scalars"]
    untrained = json.loads((out / "runs" / "untrained" / "eval.json").read_text())
    assert untrained["conditions"]["clean"]["accuracy"] == pytest.approx(tables["table3"][0]["accuracy"]["mean"])

    capsys.readouterr()
    assert main(["arms", "--quick", "--seeds", "0,1", "--out", str(out)]) == 0  # resume: nothing to redo
    again = json.loads((out / "arms.json").read_text())
    assert again["timings_this_invocation_s"] == {}
    assert again["tables"] == tables
    assert main(["arms", "--quick", "--seeds", "0,1", "--steps", "3", "--out", str(out)]) == 2
    assert "different settings" in capsys.readouterr().err
