"""The `dipreg` console script: audit end to end on the real default model, and clear errors on bad input."""

import json
import re

import numpy as np
import pytest
from conftest import assert_png_of, saved_figures

import dipreg.audit as audit_module
from dipreg.cli import main


@pytest.mark.integration
def test_audit_end_to_end_writes_json_and_figure(tmp_path, default_model, monkeypatch):
    """The audit of a pairs file (every 7th core pair: 40 pairs of all three families) on the real model, at its
    default prompt style; the summary is recomputed from the items."""
    from dipreg.stimuli import load_pairs, save_pairs

    subset = load_pairs("core")[::7]
    save_pairs(subset, tmp_path / "pairs.jsonl")
    n = len(subset)
    out = tmp_path / "audit"
    figures = saved_figures(monkeypatch, audit_module)
    assert main(["audit", "--pairs", str(tmp_path / "pairs.jsonl"), "--out", str(out)]) == 0
    payload = json.loads((out / "audit.json").read_text())
    assert payload["num_pairs"] == n == 40 and payload["num_layers"] == 30
    assert payload["prompt"] == "fewshot" and payload["prompt_shots"] == 3  # the audit's default style
    items = payload["items"]
    assert [it["id"] for it in items] == [p.id for p in subset]
    assert all(len(it["did"]) == 30 and len(it["margin_a"]) == 30 for it in items)
    assert {it["family"] for it in items} == {"value_flip", "negation", "permission"}
    summary = payload["summary"]
    assert summary["all"]["accuracy"] == pytest.approx(sum(it["correct"] for it in items) / n)
    assert summary["all"]["mean_max_wrong_dip"] == pytest.approx(sum(it["max_wrong_dip"] for it in items) / n)
    assert summary["families"]["negation"]["n"] == sum(p.family == "negation" for p in subset)
    assert summary["safety"]["n"] == sum(it["safety"] for it in items) > 0
    # trajectories.png: per family a solid line (mean output-aligned DiD) and a dashed one (mean signed DiD)
    (panel,) = figures["trajectories.png"].axes
    lines = {line.get_label(): line for line in panel.lines}
    for family in sorted({it["family"] for it in items}):
        did = np.array([it["did"] for it in items if it["family"] == family])
        line = lines[f"{family} (n={len(did)})"]
        np.testing.assert_allclose(line.get_ydata(), (np.sign(did[:, -1:]) * did).mean(0), rtol=1e-5, atol=1e-6)
        signed = next(ln for ln in panel.lines if ln.get_color() == line.get_color() and ln.get_linestyle() == "--")
        np.testing.assert_allclose(signed.get_ydata(), did.mean(0), rtol=1e-5, atol=1e-6)
    assert_png_of(out / "trajectories.png", figures["trajectories.png"])


def test_missing_pairs_file_is_reported_with_its_name(tmp_path, capsys):
    code = main(["audit", "--pairs", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "nope.jsonl" in capsys.readouterr().err


@pytest.mark.integration
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


# --- the parser: groups, help with defaults, defaults read from the run functions -----------------------------

#: How each command's help is asked for (`dipreg fit --help` is LightningCLI's own, not argparse's).
HELP_ARGV = {
    "audit": ["audit"],
    "bench": ["bench"],
    "tuned-lens": ["tuned-lens", "train"],
    "degrade": ["degrade"],
    "bridge": ["bridge"],
    "arms": ["arms"],
    "ladder": ["ladder"],
    "prompt-styles": ["prompt-styles"],
}


def _command_parser(argv):
    """The (sub-)parser that parses ``argv``'s options, from a parser built for ``argv[0]`` only."""
    from dipreg.cli import build_parser

    parser = build_parser(argv[0])
    for name in argv:
        parser = parser._subparsers._group_actions[0].choices[name]
    return parser


def test_every_command_has_a_help_entry():
    from dipreg.cli import COMMANDS

    assert set(HELP_ARGV) | {"fit"} == set(COMMANDS)


@pytest.mark.parametrize("argv", list(HELP_ARGV.values()), ids=list(HELP_ARGV))
def test_every_command_help_lists_its_options_with_their_defaults(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: dipreg {' '.join(argv)} " in text
    options = [a for a in _command_parser(argv)._actions if a.option_strings and a.dest != "help"]
    assert options
    for action in options:
        assert action.option_strings[0] in text
        assert "(default: " in action.help or action.help.endswith("(required)"), action.option_strings
    assert text.count("(default:") + text.count("(required)") == len(options)
    if argv[0] != "ladder":
        for group in ("model:", "output:"):
            assert group in text


def test_help_lists_the_fixed_choices(capsys):
    from dipreg.bench import SECTIONS
    from dipreg.lenses import LENSES
    from dipreg.prompting import PROMPT_STYLES

    helps = {}
    for name in ("audit", "bench"):
        with pytest.raises(SystemExit):
            main([name, "--help"])
        helps[name] = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert all(lens in helps["audit"] for lens in LENSES)
    assert "{" + ",".join(PROMPT_STYLES) + "}" in helps["audit"]
    assert f"from {', '.join(SECTIONS)}" in helps["bench"]


def _signature_default(function, name):
    import inspect

    return inspect.signature(function).parameters[name].default


@pytest.mark.parametrize(
    ("argv", "dest", "target", "param"),
    [
        (["audit"], "batch_size", "dipreg.audit:run_audit", "batch_size"),
        (["audit"], "window", "dipreg.audit:run_audit", "window"),
        (["audit"], "pairs", "dipreg.audit:run_audit", "pairs_name"),
        (["audit"], "lens", "dipreg.audit:run_audit", "lenses"),
        (["audit"], "out", "dipreg.audit:run_audit", "out"),
        (["degrade"], "ops", "dipreg.eval.degradation.report:run_degrade", "ops"),
        (["bridge"], "limit", "dipreg.eval.readouts.bridge:run_bridge", "limit"),
        (["bridge"], "readouts", "dipreg.eval.readouts.bridge:run_bridge", "readouts"),
        (["bridge"], "max_new_tokens", "dipreg.eval.readouts.bridge:run_bridge", "max_new_tokens"),
        (["bench"], "naive_pairs", "dipreg.bench.run:run_bench", "naive_pairs"),
        (["ladder", "--models", "a:b"], "prompt", "dipreg.eval.ladder:run_ladder", "prompt"),
        (["ladder", "--models", "a:b"], "w3", "dipreg.eval.ladder:run_ladder", "w3"),
        (
            ["tuned-lens", "train", "--corpus", "in-domain"],
            "out",
            "dipreg.lenses.tuned_training:run_tuned_lens_train",
            "out",
        ),
        (["arms"], "seeds", "dipreg.eval.arms.runner:run_arms", "seeds"),
        (["arms"], "out", "dipreg.eval.arms.runner:run_arms", "out"),
    ],
)
def test_cli_defaults_are_the_run_functions_defaults(argv, dest, target, param):
    import importlib

    from dipreg.cli import build_parser

    module, _, name = target.partition(":")
    expected = _signature_default(getattr(importlib.import_module(module), name), param)
    value = getattr(build_parser(argv[0]).parse_args(argv), dest)
    assert value == (list(expected) if isinstance(expected, tuple) and param != "window" else expected)


def test_tuned_lens_defaults_are_the_train_settings_defaults():
    from dipreg.cli import build_parser
    from dipreg.lenses.tuned_training import TrainSettings

    args = build_parser("tuned-lens").parse_args(["tuned-lens", "train", "--corpus", "in-domain"])
    settings = TrainSettings()
    assert (args.steps, args.lr, args.max_sequences, args.positions, args.vocab_top_k, args.seed) == (
        settings.steps,
        settings.lr,
        settings.max_sequences,
        settings.positions_per_sequence,
        settings.vocab_top_k,
        settings.seed,
    )


def test_a_changed_signature_default_reaches_the_run_function(monkeypatch):
    calls = {}

    def run_audit(
        model_name="m",
        pairs_name="p",
        lenses=("causal",),
        out="o",
        *,
        batch_size=3,
        window=(0.1, 0.2),
        prompt="raw",
        lens_options=None,
        console=None,
    ):
        calls.update(model_name=model_name, pairs_name=pairs_name, lenses=lenses, out=out, batch_size=batch_size)
        calls.update(window=window, prompt=prompt, lens_options=lens_options)

    monkeypatch.setattr("dipreg.audit.run_audit", run_audit)
    assert main(["audit"]) == 0
    assert calls == {
        "model_name": "m",
        "pairs_name": "p",
        "lenses": ["causal"],
        "out": "o",
        "batch_size": 3,
        "window": (0.1, 0.2),
        "prompt": "raw",
        "lens_options": {"tuned": {}, "causal": {}},
    }


def test_a_changed_train_settings_default_reaches_the_training(monkeypatch):
    import dataclasses

    from dipreg.lenses.tuned_training import TrainSettings

    @dataclasses.dataclass(frozen=True)
    class Settings(TrainSettings):
        steps: int = 7
        vocab_top_k: int = 0

    calls = []
    monkeypatch.setattr("dipreg.lenses.tuned_training.TrainSettings", Settings)

    def run_tuned_lens_train(model_name=None, corpus="out-of-domain", out=None, settings=None):
        calls.append((model_name, corpus, out, settings))

    monkeypatch.setattr("dipreg.lenses.tuned_training.run_tuned_lens_train", run_tuned_lens_train)
    assert main(["tuned-lens", "train", "--corpus", "in-domain", "--lr", "0.5"]) == 0
    ((model, corpus, out, settings),) = calls
    assert (model, corpus, out) == (None, "in-domain", None)
    assert (settings.steps, settings.vocab_top_k, settings.lr, settings.seed) == (7, 0, 0.5, TrainSettings().seed)


def test_the_audit_path_and_help_never_import_lightning(fresh_interpreter):
    """`dipreg --help`, `dipreg audit --help` (exit 0) and an audit of a missing pairs file (exit 2) in a fresh
    interpreter import no Lightning (``tests/fresh_interpreter.py``)."""
    assert fresh_interpreter["cli_help"] is None, fresh_interpreter["cli_help"]


# --- every run function checks its options before it makes its output folder or loads a model ------------------


def _python_api_calls(tmp_path):
    """(name, call(out)) for each command's run function, each with one bad option."""
    from dipreg.audit import run_audit
    from dipreg.bench.run import run_bench
    from dipreg.eval.arms.runner import run_arms
    from dipreg.eval.degradation.report import run_degrade
    from dipreg.eval.ladder import run_ladder
    from dipreg.eval.readouts.bridge import run_bridge
    from dipreg.lenses.tuned_training import run_tuned_lens_train

    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    return {
        "audit": (lambda out: run_audit(None, "core", ["logit"], out, window=(0.9, 0.1)), "window"),
        "degrade": (lambda out: run_degrade(None, "core", "late_svd:rank=64", out, batch_size=0), "--batch-size"),
        "bridge": (lambda out: run_bridge(None, out=out, limit=-3), "--limit must be an integer >= 0"),
        "bench": (lambda out: run_bench(None, str(tmp_path / "nope.jsonl"), out), "nope.jsonl"),
        "ladder": (lambda out: run_ladder("base:instruct", "core", out, limit=0), "--limit"),
        "arms": (lambda out: run_arms(None, out=out, quick=True, monitor_every=0), "monitor_every"),
        "tuned-lens": (lambda out: run_tuned_lens_train(None, str(empty), out), "has no non-empty line"),
    }


@pytest.mark.parametrize("name", ["audit", "degrade", "bridge", "bench", "ladder", "arms", "tuned-lens"])
def test_python_api_checks_options_before_the_output_folder_and_the_model(name, tmp_path, monkeypatch):
    import dipreg.audit
    import dipreg.bench.run
    import dipreg.eval.arms.evaluate
    import dipreg.eval.degradation.report
    import dipreg.eval.ladder
    import dipreg.eval.readouts.bridge
    import dipreg.lenses.tuned_training
    import dipreg.training.module

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    modules = (dipreg.audit, dipreg.bench.run, dipreg.eval.arms.evaluate, dipreg.eval.degradation.report)
    modules += (dipreg.eval.ladder, dipreg.eval.readouts.bridge, dipreg.lenses.tuned_training, dipreg.training.module)
    for module in modules:
        monkeypatch.setattr(module, "load_model", no_model)
    call, fragment = _python_api_calls(tmp_path)[name]
    out = tmp_path / "out"
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(fragment)):
        call(out)
    assert not out.exists()


def test_fit_help_lists_the_health_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "--health.diverged_steps" in text and "--health.tolerance" in text and "--heldout.sets" in text


def missing_pairs_argv(tmp_path) -> list[str]:
    return ["audit", "--pairs", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")]


def test_debug_flag_shows_the_traceback_instead_of_one_line(tmp_path, capsys, monkeypatch):
    """With ``--debug`` before the command the error leaves ``main`` (the console script then ends with Python's
    traceback and exit code 1), even when ``DIPREG_DEBUG`` says 0; without it the same error is one line, exit 2."""
    monkeypatch.setenv("DIPREG_DEBUG", "0")
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        main(["--debug", *missing_pairs_argv(tmp_path)])
    assert "error:" not in capsys.readouterr().err
    assert main(missing_pairs_argv(tmp_path)) == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["1", "yes"])
def test_debug_environment_variable_lets_the_error_through(tmp_path, capsys, monkeypatch, value):
    monkeypatch.setenv("DIPREG_DEBUG", value)
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        main(missing_pairs_argv(tmp_path))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("value", ["0", ""])
def test_without_debug_an_error_is_one_line(tmp_path, capsys, monkeypatch, value):
    monkeypatch.setenv("DIPREG_DEBUG", value)
    assert main(missing_pairs_argv(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "nope.jsonl" in err
