"""`dipreg arms`: recipe lookup, arm expansion, an arm built through the `dipreg fit` LightningCLI (every recipe
setting reaches it), the per-seed statistics, and a real --quick run on the default model whose report is checked
against the numbers read back from arms.json; a second invocation resumes without retraining."""

from __future__ import annotations

import io
import json
import math
import os
import random
import shutil
import statistics
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch.cli as lightning_cli
import pytest
import yaml
from rich.console import Console
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from dipreg import artifacts
from dipreg.callbacks.heldout import HeldOutEval
from dipreg.cli import main
from dipreg.eval.arms import runner as arms_runner
from dipreg.eval.arms import train as arms_train
from dipreg.eval.arms.evaluate import parse_conditions
from dipreg.eval.arms.plan import ArmSpec, ArmsSettings, build_arms
from dipreg.eval.arms.runner import EVAL_DONE
from dipreg.eval.arms.stats import mean_sd, per_seed_mcnemar
from dipreg.eval.arms.train import RECIPE_FILE, TRAIN_DONE, ArmRun, build_arm_run
from dipreg.losses import WrongMarginHinge
from dipreg.recipes import RECIPES, load_recipe, recipe_path
from tests.conftest import make_tiny_model

#: The integration run: two arms (the McNemar reference and a hinge arm) x two seeds (mean ± sd, per-seed McNemar),
#: two steps, four conditions (clean, a quantizer, an SVD, the deprivation behind fragility) on 12 pairs: the whole
#: pipeline at a CI size.
ARMS = ("output_only", "dip_reg_l0.2")
QUICK_RUN = [
    "arms", "--quick", "--arms", "output_only,dip_reg", "--seeds", "0,1", "--steps", "2", "--eval-limit", "12",
    "--conditions", "clean,rtn:bits=3,mid_svd:rank=64,deprive:alpha=0",
]  # fmt: skip


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


def _mean_sd_text(values):
    """A Table 3 cell computed here from the per-seed values: "mean ± sd" (sample sd), or the mean of one value."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


@pytest.mark.integration
def test_quick_arms_run_reports_every_arm_from_arms_json_and_resumes(tmp_path, capsys):
    out = tmp_path / "arms"
    assert main([*QUICK_RUN, "--out", str(out)]) == 0
    result = json.loads((out / "arms.json").read_text())
    tables = result["tables"]
    assert [row["arm"] for row in tables["table3"]] == ["untrained", *ARMS]
    assert [row["arm"] for row in tables["table5"]] == ["untrained", *ARMS]
    conditions = [row["condition"] for row in tables["table4"]]
    assert conditions[0] == "clean" and "mid_svd:rank=64" in conditions and "rtn:bits=3" in conditions
    report = (out / "report.md").read_text()
    for row in tables["table3"]:
        cells = [
            _mean_sd_text(row[k]["values"]) for k in ("accuracy", "dip", "commit", "fragility", "nll", "retention")
        ]
        assert "| " + " | ".join([row["arm"], *cells]) + " |" in report
    for row in tables["table4"]:
        assert set(row["arms"]) == set(ARMS)
        for arm in ARMS[1:]:
            tests = row["mcnemar_vs_output_only"][arm]
            assert [t["seed"] for t in tests] == [0, 1]
            # Table 4b: one line per condition x arm, one cell per seed with that seed's discordant counts.
            [line] = [ln for ln in report.splitlines() if ln.startswith(f"| {row['condition']} | {arm} |")]
            cells = [c.strip() for c in line.strip("|").split("|")][2:]
            assert [c.split(" ")[1] for c in cells] == [f"({t['b']}:{t['c']})" for t in tests]
    assert len(tables["forecast"]["runs"]) == 4
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
    assert main([*QUICK_RUN, "--out", str(out)]) == 0  # resume: nothing to redo
    again = json.loads((out / "arms.json").read_text())
    assert again["timings_this_invocation_s"] == {}
    assert again["tables"] == tables
    assert main([*QUICK_RUN, "--steps", "3", "--out", str(out)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "different settings" in err and "max_steps: 2 → 3" in err


# -- resuming: markers, damaged markers, interrupted units (fast fakes for training and evaluation) ------------
#
# The fakes replace only what needs a model: `build_arm_run` (the real `train_arm` still runs: it fits the fake
# trainer, writes retention.json and then train.json through `write_json`) and the runner's `_eval_run` (the real
# evaluate stage writes eval.json). The fake fit writes one real TensorBoard events file and an adapter folder, as a
# real fit does. What the fakes cannot exercise: Lightning's own files and a real adapter/evaluation (the
# integration test above resumes a real --quick run).


class FakeArms:
    """Counts fits and evaluations; installs the fakes with ``monkeypatch``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.fits: list[tuple[str, int]] = []
        self.evals: list[str] = []
        monkeypatch.setattr(arms_train, "build_arm_run", self.build_arm_run)
        monkeypatch.setattr(arms_runner, "_eval_run", self.eval_run)

    def build_arm_run(self, arm, seed, settings, run_dir, model_name=None):
        run_dir.mkdir(parents=True, exist_ok=True)
        tb = run_dir / "tb"

        def fit(module, data):
            self.fits.append((arm.name, seed))
            writer = SummaryWriter(str(tb))
            writer.add_scalar("train/loss", 1.0, 1)
            writer.close()
            (tb / "adapter").mkdir(parents=True, exist_ok=True)
            (tb / "adapter" / "adapter_config.json").write_text("{}")

        history = [
            {"step": float(step), "dip/logit/accuracy": 0.5 + 0.1 * step, "dip/logit/max_wrong_dip": 0.3 - 0.05 * step}
            | {"dip/causal/max_wrong_dip": 0.4}
            for step in (0, 2, 4)
        ]
        module = SimpleNamespace(adapter_dir=lambda: tb / "adapter")
        trainer = SimpleNamespace(
            fit=fit, save_checkpoint=lambda path: Path(path).write_bytes(b"ckpt"), global_step=4, callback_metrics={}
        )
        return ArmRun(module, None, trainer, SimpleNamespace(history=history), SimpleNamespace(history=[]))

    def eval_run(self, model_name, adapter, pairs, settings, describe):
        self.evals.append("untrained" if adapter is None else f"{adapter.parents[2].name}/{adapter.parents[1].name}")
        rng = random.Random(len(self.evals))
        clean = [rng.random() < 0.7 for _ in pairs]
        conditions = {}
        for label, _name, _params in parse_conditions(settings.conditions):
            correct = clean if label == "clean" else [c and rng.random() < 0.8 for c in clean]
            flips = sum(a and not b for a, b in zip(clean, correct, strict=True))
            conditions[label] = {
                "accuracy": sum(correct) / len(correct),
                "n_flips": flips,
                "flip_rate": flips / max(sum(clean), 1),
                "correct": correct,
            }
        lens = {"n": len(pairs), "accuracy": 0.7, "mean_max_wrong_dip": 0.2, "mean_commit_layer_frac": 0.5}
        return {
            "n": len(pairs),
            "ids": [p.id for p in pairs],
            "checksum": "fake",
            "summary": {"logit": lens, "causal": lens},
            "items": {
                "logit_dip": [0.1] * len(pairs),
                "causal_dip": [0.2] * len(pairs),
                "final_did": [1.0] * len(pairs),
            },
            "conditions": conditions,
            "fragility": 0.1,
            "nll": 2.5,
        }


def _run_fake_arms(out, **overrides):
    console = Console(file=io.StringIO(), width=400)
    result = arms_runner.run_arms(
        None, ["output_only", "late_only"], seeds=[0], quick=True, out=out, console=console, **overrides
    )
    return result, console.file.getvalue()


def _events(run_dir):
    return sorted((run_dir / "tb").glob("events.out.tfevents.*"))


def test_a_unit_killed_between_the_temp_write_and_the_rename_of_its_marker_reruns_alone(tmp_path, monkeypatch):
    fake = FakeArms(monkeypatch)
    out = tmp_path / "arms"
    late = out / "runs" / "late_only" / "seed0"
    real_replace = os.replace

    def killed(src, dst):
        if Path(dst) == late / TRAIN_DONE:
            raise OSError("injected: killed between the temp write and os.replace")
        return real_replace(src, dst)

    monkeypatch.setattr(artifacts.os, "replace", killed)
    with pytest.raises(OSError, match="injected"):
        _run_fake_arms(out)
    monkeypatch.setattr(artifacts.os, "replace", real_replace)
    assert fake.fits == [("output_only", 0), ("late_only", 0)]
    assert not (late / TRAIN_DONE).exists() and not list(late.glob(".*.tmp")), "no marker, no temporary file"
    assert len(_events(late)) == 1  # the killed attempt left its events file behind

    fake.fits.clear()
    result, _ = _run_fake_arms(out)
    assert fake.fits == [("late_only", 0)], "only the unit without a marker trains again"
    assert len(_events(late)) == 1, "the rerun unit starts from a clean run folder: one events file"
    assert len(_events(out / "runs" / "output_only" / "seed0")) == 1
    assert sorted(fake.evals) == ["late_only/seed0", "output_only/seed0", "untrained"]
    assert [row["arm"] for row in result["tables"]["table3"]] == ["untrained", "output_only", "late_only"]
    assert json.loads((late / TRAIN_DONE).read_text())["steps"] == 4


def test_a_damaged_marker_is_named_and_its_unit_reruns(tmp_path, monkeypatch):
    fake = FakeArms(monkeypatch)
    out = tmp_path / "arms"
    first, _ = _run_fake_arms(out)
    unit = out / "runs" / "output_only" / "seed0"
    train_json = unit / TRAIN_DONE
    train_json.write_bytes(train_json.read_bytes()[: train_json.stat().st_size // 2])  # truncated
    untrained_eval = out / "runs" / "untrained" / EVAL_DONE
    untrained_eval.write_text("not json at all")
    fake.fits.clear()
    fake.evals.clear()

    result, printed = _run_fake_arms(out)
    printed = " ".join(printed.split())
    assert (
        f"{train_json} is not a complete JSON record" in printed and "training output_only seed 0 runs again" in printed
    )
    assert f"{untrained_eval} is not a complete JSON record" in printed
    assert "the evaluation of untrained runs again" in printed
    assert fake.fits == [("output_only", 0)]
    assert sorted(fake.evals) == ["output_only/seed0", "untrained"], "its stale eval.json went with its run folder"
    assert len(_events(unit)) == 1
    assert json.loads(train_json.read_text())["arm"] == "output_only"
    assert [row["arm"] for row in result["tables"]["table3"]] == [row["arm"] for row in first["tables"]["table3"]]


def test_a_marker_missing_a_field_or_its_adapter_is_not_finished(tmp_path, monkeypatch):
    fake = FakeArms(monkeypatch)
    out = tmp_path / "arms"
    _run_fake_arms(out)
    late = out / "runs" / "late_only" / "seed0"
    (late / "retention.json").write_text('{"ops": "mid_svd:rank=64"}')  # no history
    shutil.rmtree(out / "runs" / "output_only" / "seed0" / "tb" / "adapter")
    fake.fits.clear()
    _, printed = _run_fake_arms(out)
    printed = " ".join(printed.split())
    assert f"{late / 'retention.json'} lacks the field(s) history" in printed
    assert "names the adapter" in printed and "which is missing" in printed
    assert sorted(fake.fits) == [("late_only", 0), ("output_only", 0)]


def test_resuming_with_other_settings_names_each_changed_field(tmp_path, monkeypatch):
    FakeArms(monkeypatch)
    out = tmp_path / "arms"
    _run_fake_arms(out)
    with pytest.raises(ValueError) as info:
        _run_fake_arms(out, monitor_every=3, eval_pairs="comp_strict")
    message = str(info.value)
    assert f"{out} holds an arms run with different settings ({out / 'arms_config.json'})" in message
    assert 'monitor_every: 2 → 3; eval_pairs: "strict240" → "comp_strict"' in message
    assert "max_steps" not in message and "pass a new --out" in message
    _run_fake_arms(out)  # the same settings still resume


def test_arms_resume_after_a_unit_that_raised_midway_redoes_only_that_unit(tmp_path, monkeypatch):
    fake = FakeArms(monkeypatch)
    out = tmp_path / "arms"
    real_build = fake.build_arm_run

    def build_then_crash(arm, seed, settings, run_dir, model_name=None):
        run = real_build(arm, seed, settings, run_dir, model_name)
        if arm.name == "late_only":
            fit = run.trainer.fit

            def crash(module, data):
                fit(module, data)  # the events file and adapter folder of a half-done fit exist
                raise RuntimeError("injected: the job died in the middle of training")

            run.trainer.fit = crash
        return run

    monkeypatch.setattr(arms_train, "build_arm_run", build_then_crash)
    with pytest.raises(RuntimeError, match="middle of training"):
        _run_fake_arms(out)
    late = out / "runs" / "late_only" / "seed0"
    assert not (late / TRAIN_DONE).exists() and (out / "runs" / "output_only" / "seed0" / TRAIN_DONE).exists()

    monkeypatch.setattr(arms_train, "build_arm_run", real_build)
    real_eval = arms_runner._eval_run

    def eval_then_crash(model_name, adapter, pairs, settings, describe):
        if adapter is not None and adapter.parents[2].name == "output_only":
            describe("clean")
            raise RuntimeError("injected: the job died in the middle of an evaluation")
        return real_eval(model_name, adapter, pairs, settings, describe)

    monkeypatch.setattr(arms_runner, "_eval_run", eval_then_crash)
    fake.fits.clear()
    with pytest.raises(RuntimeError, match="middle of an evaluation"):
        _run_fake_arms(out)
    assert fake.fits == [("late_only", 0)], "only the interrupted training runs again"
    assert len(_events(late)) == 1, "the rerun started from a clean run folder"
    assert not (out / "runs" / "output_only" / "seed0" / EVAL_DONE).exists()

    monkeypatch.setattr(arms_runner, "_eval_run", real_eval)
    assert fake.evals[-1] == "untrained"  # finished before the crash (the fake records it, the crash records none)
    fake.fits.clear()
    fake.evals.clear()
    result, _ = _run_fake_arms(out)
    assert fake.fits == [], "every training is finished"
    assert sorted(fake.evals) == ["late_only/seed0", "output_only/seed0"], "untrained is not evaluated again"
    assert [row["arm"] for row in result["tables"]["table3"]] == ["untrained", "output_only", "late_only"]
    assert json.loads((late / TRAIN_DONE).read_text())["steps"] == 4


def test_report_completed_covers_every_invocation_that_shared_the_out_folder(tmp_path, monkeypatch):
    """Two ``dipreg arms`` invocations into one ``--out``, seed 0 then seed 1: the second one's own report covers
    seed 1 only; ``report_completed`` covers both seeds, each McNemar count recounted here from the two arms'
    per-item results in that seed's eval.json files."""
    FakeArms(monkeypatch)
    out = tmp_path / "arms"
    console = Console(file=io.StringIO(), width=400)
    arms = ["output_only", "late_only"]
    for seed in (0, 1):
        second = arms_runner.run_arms(None, arms, seeds=[seed], quick=True, out=out, console=console)
    assert {t["seed"] for row in second["tables"]["table4"] for t in row["mcnemar_vs_output_only"]["late_only"]} == {1}
    combined = arms_runner.report_completed(out, console=console)
    assert [row["arm"] for row in combined["tables"]["table3"]] == ["untrained", *arms]
    assert [len(row["accuracy"]["values"]) for row in combined["tables"]["table3"][1:]] == [2, 2]

    def correct(arm: str, seed: int, condition: str) -> list[bool]:
        record = json.loads((out / "runs" / arm / f"seed{seed}" / EVAL_DONE).read_text())
        return record["conditions"][condition]["correct"]

    counted = 0
    for row in combined["tables"]["table4"]:
        tests = row["mcnemar_vs_output_only"]["late_only"]
        assert [t["seed"] for t in tests] == [0, 1]
        for test in tests:
            ref, arm = (
                correct("output_only", test["seed"], row["condition"]),
                correct("late_only", test["seed"], row["condition"]),
            )
            only_ref = sum(r and not a for r, a in zip(ref, arm, strict=True))
            only_arm = sum(a and not r for r, a in zip(ref, arm, strict=True))
            assert sorted((test["b"], test["c"])) == sorted((only_ref, only_arm))
            counted += only_ref + only_arm
    assert counted > 0, "the fake evaluations must disagree somewhere for the counts to mean anything"
    written = json.loads((out / "arms.json").read_text())["tables"]["table4"]
    assert [[t["seed"] for t in row["mcnemar_vs_output_only"]["late_only"]] for row in written] == [[0, 1]] * len(
        written
    )
