"""`dipreg arms` with the causal and tuned hinge arms: the plan (every hinge arm swept over λ, the tuned lens
path), the recipes, Table 5's changes, agreement and the "lens-shaped repair" flag on hand-made evaluations."""

from __future__ import annotations

import math

import pytest

from dipreg.eval.arms.plan import ARM_RECIPES, DEFAULT_ARMS, ArmSpec, build_arms
from dipreg.eval.arms.report import build_tables
from dipreg.eval.arms.stats import arm_table, causal_table, lens_shaped_reasons, lens_shaped_repair
from dipreg.losses import CausalMarginHinge, TunedMarginHinge, WrongMarginHinge
from dipreg.recipes import RECIPES, load_recipe


def test_every_hinge_arm_gets_one_arm_per_lambda_with_its_weight():
    specs = build_arms(["output_only", "late_only", "dip_reg", "dip_reg_causal"], [0.05, 0.2, 0.5])
    assert [s.name for s in specs] == [
        "output_only",
        "late_only",
        *(f"{arm}_l{lam}" for arm in ("dip_reg", "dip_reg_causal") for lam in ("0.05", "0.2", "0.5")),
    ]
    for spec in specs[2:]:
        (hinge,) = spec.recipe_config()["model"]["aux_losses"]
        assert hinge["init_args"]["weight"] == spec.lam
        expected = "CausalMarginHinge" if spec.recipe == "dip_reg_causal" else "WrongMarginHinge"
        assert hinge["class_path"].endswith(expected)
    assert DEFAULT_ARMS == ("output_only", "late_only", "dip_reg")
    assert {"dip_reg_causal", "dip_reg_tuned"} <= set(ARM_RECIPES) <= set(RECIPES)
    with pytest.raises(ValueError, match="twice"):
        build_arms(["dip_reg", "dip_reg"], [0.2])


def test_the_tuned_arm_reads_the_lens_the_runner_gives_it():
    (spec,) = build_arms(["dip_reg_tuned"], [0.5])
    assert spec.needs_tuned_lens() and not ArmSpec("dip_reg", "dip_reg").needs_tuned_lens()
    with_lens = ArmSpec(spec.name, spec.recipe, spec.lam, tuned_lens="/runs/x/tuned-lens/tuned-lens.pt")
    (hinge,) = with_lens.recipe_config()["model"]["aux_losses"]
    assert hinge["init_args"] | {} == {
        **load_recipe("dip_reg_tuned")["model"]["aux_losses"][0]["init_args"],
        "weight": 0.5,
        "tuned_lens": "/runs/x/tuned-lens/tuned-lens.pt",
    }


@pytest.mark.parametrize(("name", "cls"), [("dip_reg_causal", CausalMarginHinge), ("dip_reg_tuned", TunedMarginHinge)])
def test_new_recipes_match_dip_reg_except_the_hinge(name, cls):
    recipe, base = load_recipe(name), load_recipe("dip_reg")
    assert {k: v for k, v in recipe.items() if k != "model"} | {"trainer": None} == {
        k: v for k, v in base.items() if k != "model"
    } | {"trainer": None}
    assert {k: v for k, v in recipe["trainer"].items() if k != "default_root_dir"} == {
        k: v for k, v in base["trainer"].items() if k != "default_root_dir"
    }
    assert {k: v for k, v in recipe["model"].items() if k != "aux_losses"} == {
        k: v for k, v in base["model"].items() if k != "aux_losses"
    }
    (spec,) = recipe["model"]["aux_losses"]
    (base_spec,) = base["model"]["aux_losses"]
    hinge, base_hinge = cls(**spec["init_args"]), WrongMarginHinge(**base_spec["init_args"])
    # the same λ, window and margin as dip_reg's logit hinge, as built (not as written in the recipe)
    assert (hinge.weight, hinge.window, hinge.delta) == (base_hinge.weight, base_hinge.window, base_hinge.delta)


def _eval(logit_dip, causal_dip, rho, sign=0.8):
    summary = {"accuracy": 0.9, "mean_max_wrong_dip": logit_dip, "mean_commit_layer_frac": 0.5}
    return {
        "summary": {"logit": summary, "causal": {**summary, "mean_max_wrong_dip": causal_dip}},
        "agreement": {"spearman": rho, "sign": sign},
        "conditions": {"clean": {"accuracy": 0.9, "correct": [True]}},
        "fragility": 0.1,
        "nll": 2.0,
    }


def _runs():
    def run(arm, recipe, lam, seed, ev, step):
        return {
            "arm": arm,
            "recipe": recipe,
            "lambda": lam,
            "seed": seed,
            "eval": ev,
            "train": {"step_seconds_median": step},
        }

    return [
        run("output_only", "output_only", None, 0, _eval(0.60, 0.40, 0.70), 1.0),
        run("output_only", "output_only", None, 1, _eval(0.80, 0.40, 0.50), 3.0),
        # logit dip 0.1 (-86 %) and ρ 0.1 (-0.5): lens-shaped
        run("dip_reg_l0.2", "dip_reg", 0.2, 0, _eval(0.10, 0.50, 0.10), 2.2),
        run("dip_reg_l0.2", "dip_reg", 0.2, 1, _eval(0.10, 0.50, 0.10), 2.2),
        # the causal dip falls by half and agreement holds: not flagged
        run("dip_reg_causal_l0.2", "dip_reg_causal", 0.2, 0, _eval(0.50, 0.20, 0.60), 3.0),
        # logit dip 0.2 (-71 %), agreement holds (0.62), causal dip 0.45 > output_only's 0.40: flagged
        run("dip_reg_tuned_l0.2", "dip_reg_tuned", 0.2, 0, _eval(0.20, 0.45, 0.62), 2.0),
    ]


def test_table5_changes_agreement_and_the_lens_shaped_flag_by_hand():
    rows = {r["arm"]: r for r in causal_table(_runs(), _eval(0.5, 0.25, 0.65))}
    assert rows["output_only"]["causal_dip"]["mean"] == pytest.approx(0.40)
    assert rows["dip_reg_causal_l0.2"]["change_vs_output_only"] == pytest.approx((0.20 - 0.40) / 0.40)
    assert rows["dip_reg_causal_l0.2"]["change_vs_untrained"] == pytest.approx((0.20 - 0.25) / 0.25)
    assert rows["dip_reg_l0.2"]["change_vs_output_only"] == pytest.approx(0.25)
    assert rows["untrained"]["change_vs_output_only"] == pytest.approx((0.25 - 0.40) / 0.40)
    assert rows["output_only"]["agreement_spearman"]["mean"] == pytest.approx(0.60)
    flags = {arm: row["lens_shaped_repair"] for arm, row in rows.items()}
    assert flags == {
        "untrained": False,
        "output_only": False,
        "dip_reg_l0.2": True,
        "dip_reg_causal_l0.2": False,
        "dip_reg_tuned_l0.2": True,
    }
    reasons = {arm: row["lens_shaped_reasons"] for arm, row in rows.items() if row["lens_shaped_repair"]}
    # dip_reg: ρ 0.1 vs 0.6 and causal dip 0.50 vs 0.40; dip_reg_tuned: only its causal dip stayed up
    assert reasons == {
        "dip_reg_l0.2": ["agreement fell", "causal dip did not fall"],
        "dip_reg_tuned_l0.2": ["causal dip did not fall"],
    }
    assert {r["reference"] for r in rows.values()} == {"output_only"}
    steps = {r["arm"]: r.get("step_overhead") for r in arm_table(_runs(), _eval(0.5, 0.25, 0.65))}
    assert steps["dip_reg_l0.2"] == pytest.approx(2.2 / 2.0 - 1) and steps["dip_reg_causal_l0.2"] == pytest.approx(0.5)


def test_lens_shaped_rule_edges():
    ref = {"dip": 0.8, "agreement_spearman": 0.6, "causal_dip": 0.4}
    assert lens_shaped_reasons({"dip": 0.59, "agreement_spearman": 0.39, "causal_dip": 0.1}, ref) == [
        "agreement fell"  # just past -25 % and -0.20
    ]
    assert lens_shaped_reasons({"dip": 0.59, "agreement_spearman": 0.6, "causal_dip": 0.4}, ref) == [
        "causal dip did not fall"  # equal counts as not fallen
    ]
    assert not lens_shaped_repair({"dip": 0.59, "agreement_spearman": 0.6, "causal_dip": 0.399}, ref)
    assert not lens_shaped_repair({"dip": 0.61, "agreement_spearman": 0.0, "causal_dip": 0.9}, ref)  # dip fell < 25 %
    assert not lens_shaped_repair({"dip": 0.1, "agreement_spearman": 0.41, "causal_dip": 0.1}, ref)  # both held
    assert not lens_shaped_repair({"dip": 0.1, "agreement_spearman": 0.0, "causal_dip": 0.9}, ref, is_hinge=False)
    assert not lens_shaped_repair({"dip": 0.1, "agreement_spearman": math.nan, "causal_dip": math.nan}, ref)
    assert lens_shaped_reasons({"dip": 0.1, "agreement_spearman": math.nan, "causal_dip": 0.5}, ref) == [
        "causal dip did not fall"  # a missing agreement leaves the other criterion
    ]


def test_report_renders_the_new_columns():
    runs = _runs()
    untrained = _eval(0.5, 0.25, 0.65)
    result = {
        "tables": {
            "retention_condition": "clean",
            "table3": arm_table(runs, untrained),
            "table4": [],
            "table5": causal_table(runs, untrained),
            "forecast": {
                "retention_condition": "clean",
                "saturation_accuracy": 0.95,
                "runs": [],
                "spearman_logit_dip_vs_retention": {"rho": None, "p": None},
                "spearman_causal_dip_vs_retention": {"rho": None, "p": None},
                "spearman_accuracy_vs_retention": {"rho": None, "p": None},
                "end_accuracy_spread_across_arms": None,
                "end_dip_spread_across_arms": None,
            },
        },
        "seeds": [0, 1],
        "eval_pairs": "x",
        "eval_n": 1,
    }
    t3, _, _, t5, _ = build_tables(result)
    assert t3.columns[-1] == "step overhead" and t3.rows[2][-1] == "+10%"
    by_arm = {row[0]: row for row in t5.rows}
    assert by_arm["dip_reg_l0.2"][-1] == "lens-shaped repair (agreement fell, causal dip did not fall)"
    assert by_arm["dip_reg_tuned_l0.2"][-1] == "lens-shaped repair (causal dip did not fall)"
    assert by_arm["dip_reg_causal_l0.2"][-1] == ""
    assert by_arm["dip_reg_causal_l0.2"][4] == "-50%" and by_arm["output_only"][6] == "0.600 ± 0.141"


def test_the_runner_gives_every_tuned_arm_the_runs_lens_and_trains_it_once(tmp_path, monkeypatch):
    from dipreg.eval.arms import runner, tuned
    from dipreg.lenses.tuned import TunedLens

    trained = []

    def fake_train(model_name, corpus, out, settings, console=None):
        trained.append((model_name, corpus, settings.steps))
        TunedLens(2, 4).save(out / "tuned-lens.pt")  # ensure_tuned_lens checks that it loads, not its shape

    monkeypatch.setattr(tuned, "run_tuned_lens_train", fake_train)
    seen = {}

    def fake_train_stage(specs, seeds, settings, out_dir, **kwargs):
        seen["specs"] = specs
        return {}

    monkeypatch.setattr(runner, "train_stage", fake_train_stage)
    monkeypatch.setattr(runner, "evaluate_stage", lambda *a, **k: {})
    monkeypatch.setattr(runner, "report_stage", lambda *a, **k: {})
    monkeypatch.setattr(runner.ArmsSettings, "check_pair_sets", lambda self: None)  # loading the sets costs seconds
    for _ in range(2):  # the second run (a resume) reuses the lens
        runner.run_arms(None, ["output_only", "dip_reg_tuned"], [0.2], [0], quick=True, out=tmp_path / "arms")
    lens = tmp_path / "arms" / "tuned-lens" / "tuned-lens.pt"
    assert trained == [(None, "out-of-domain", 20)]
    plain, with_lens = seen["specs"]
    assert plain.tuned_lens is None and with_lens.tuned_lens == str(lens)
    (hinge,) = with_lens.recipe_config()["model"]["aux_losses"]
    assert hinge["init_args"]["tuned_lens"] == str(lens) and hinge["init_args"]["weight"] == 0.2
    lens.write_bytes(b"damaged")
    assert tuned.ensure_tuned_lens(tmp_path / "arms", None)[0] == lens and len(trained) == 2
