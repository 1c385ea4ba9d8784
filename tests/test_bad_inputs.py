"""Every bad input is named: one table row per bad input (the input, the error type or CLI exit code it must give,
and a fragment of the one-line message that names the culprit), and property-style tests of the stimulus loader
(random bytes and random JSON values per field only ever raise ``StimulusError``)."""

from __future__ import annotations

import json
import math
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from dipreg import artifacts
from dipreg.artifacts import write_json
from dipreg.callbacks import DipMonitor, TrainingDivergedError, TrainingHealth
from dipreg.cli import COMMANDS, main
from dipreg.eval import DegradeError, degrade
from dipreg.eval.arms.plan import ArmsSettings
from dipreg.eval.degradation.operators import RestoreError
from dipreg.lenses.tuned import TunedLens, TunedLensFileError
from dipreg.stimuli import MinimalPair, StimulusError, load_pairs, save_pairs
from dipreg.training.data import PairDataModule
from dipreg.training.module import CheckpointMismatchError, DipRegModule
from tests.conftest import make_tiny_model

# -- the environment a row runs in -------------------------------------------------------------------------


@dataclass
class Env:
    """What a row may use: a fresh folder, pytest's monkeypatch, the tiny tokenizer and a saved tiny model."""

    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    tokenizer: Any
    model_dir: Path
    pairs_file: Path
    tiny_pairs: list[MinimalPair]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tiny_tokenizer, tiny_pairs) -> tuple[Path, Path]:
    """A tiny Llama and its tokenizer saved to a folder (for ``--model PATH``), and a valid pairs file."""
    root = tmp_path_factory.mktemp("bad-inputs")
    model_dir = root / "tiny-llama"
    make_tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    return model_dir, save_pairs(tiny_pairs, root / "pairs.jsonl")


@pytest.fixture
def env(tmp_path, monkeypatch, tiny_tokenizer, saved_model, tiny_pairs) -> Env:
    return Env(tmp_path, monkeypatch, tiny_tokenizer, *saved_model, tiny_pairs)


# -- stimuli -----------------------------------------------------------------------------------------------

GOOD = {
    "id": "p1",
    "ctx_a": "Question : is it wrong to steal ? Answer :",
    "ctx_b": "Question : is it right to steal ? Answer :",
    "t_pos": " Yes",
    "t_neg": " No",
    "family": "value_flip",
    "safety": True,
    "category": "law",
}


def record(**changes: Any) -> dict[str, Any]:
    """:data:`GOOD` with ``changes`` (a value of ``...`` deletes the field)."""
    out = {**GOOD, **changes}
    return {k: v for k, v in out.items() if v is not ...}


def jsonl(env: Env, *lines: str | bytes | dict, name: str = "pairs.jsonl") -> Path:
    """Write lines (objects as JSON, text as is, bytes raw) to a file in ``env.tmp``."""
    data = b"".join(
        (ln if isinstance(ln, bytes) else (ln if isinstance(ln, str) else json.dumps(ln)).encode()) + b"\n"
        for ln in lines
    )
    path = env.tmp / name
    path.write_bytes(data)
    return path


def audit(env: Env, pairs: Path, *extra: str) -> int:
    """``dipreg audit`` of the saved tiny model on ``pairs``: the exit code."""
    out = env.tmp / "audit"
    return main(
        ["audit", "--model", str(env.model_dir), "--pairs", str(pairs), "--prompt", "raw", *extra, "--out", str(out)]
    )


def audit_pairs(*lines: str | bytes | dict) -> Callable[[Env], int]:
    return lambda env: audit(env, jsonl(env, *lines))


# -- tuned lenses --------------------------------------------------------------------------------------------


class PicklePayload:
    """An object whose unpickling would call a function: what ``weights_only=True`` must refuse."""

    def __reduce__(self):
        return (print, ("this must never run",))


def lens_blob(layers: int = 8, width: int = 32) -> dict[str, Any]:
    lens = TunedLens(layers, width, {"model_id": "tiny"})
    return {"meta": {**lens.meta, "num_layers": layers, "hidden_size": width}, "state_dict": lens.state_dict()}


def audit_lens(make: Callable[[Path], None]) -> Callable[[Env], int]:
    """A row that writes a lens file with ``make(path)`` and audits the tiny model with ``--lens tuned``."""

    def run(env: Env) -> int:
        path = env.tmp / "tuned-lens.pt"
        make(path)
        return audit(env, env.pairs_file, "--lens", "tuned", "--tuned-lens", str(path))

    return run


def save_blob(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        blob = lens_blob()
        change(blob)
        torch.save(blob, path)

    return make


def load_lens(make: Callable[[Path], None]) -> Callable[[Env], object]:
    """A row that writes a lens file with ``make(path)`` and reads it with ``TunedLens.load`` (the Python API)."""

    def run(env: Env) -> object:
        path = env.tmp / "tuned-lens.pt"
        make(path)
        return TunedLens.load(env.tmp)  # the folder: its tuned-lens.pt

    return run


def garbage(path: Path) -> None:
    path.write_bytes(random.Random(0).randbytes(3000))


def truncated(path: Path) -> None:
    torch.save(lens_blob(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def other_model(path: Path) -> None:
    TunedLens(6, 32, {"model_id": "other"}).save(path)


def _rename_key(blob: dict) -> None:
    blob["state_dict"]["translators.0.bias_"] = blob["state_dict"].pop("translators.0.bias")


def _fewer_translators(blob: dict) -> None:
    blob["state_dict"] = {k: v for k, v in blob["state_dict"].items() if int(k.split(".")[1]) < 5}


def _narrow(blob: dict) -> None:
    blob["state_dict"] = TunedLens(8, 16).state_dict()


def _nan_weight(blob: dict) -> None:
    blob["state_dict"]["translators.3.weight"][0, 0] = float("nan")


# -- checkpoints -------------------------------------------------------------------------------------------


def tiny_module(env: Env, **kwargs: Any) -> DipRegModule:
    kwargs = {"r": 4, "alpha": 8, "aux_losses": [], **kwargs}
    return DipRegModule(model=make_tiny_model("llama"), tokenizer=env.tokenizer, **kwargs)


def load_checkpoint(written: dict[str, Any], loading: dict[str, Any]) -> Callable[[Env], object]:
    """Save the adapter-only state dict of a module built with ``written`` and load it into one built with
    ``loading`` (as Lightning does when resuming)."""

    def run(env: Env) -> object:
        checkpoint = tiny_module(env, **written).state_dict()
        return tiny_module(env, **loading).load_state_dict(checkpoint, strict=False)

    return run


# -- the monitor on a diverged model -----------------------------------------------------------------------


class NaNStepModule(pl.LightningModule):
    """A LoRA-free module whose single training step turns every weight into NaN (a NaN loss)."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__()
        self.net = make_tiny_model("llama")
        self.tokenizer = tokenizer

    def training_step(self, batch, batch_idx):
        return self.net(input_ids=batch, labels=batch).loss * torch.tensor(float("nan"))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def bare_trainer(env: Env, max_steps: int, callback: pl.Callback) -> pl.Trainer:
    """A CPU Trainer with nothing attached but ``callback`` (no logger, checkpoints, progress bar or validation)."""
    return pl.Trainer(
        default_root_dir=env.tmp,
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[callback],
    )


def fit_with_monitor(env: Env, module: pl.LightningModule, data: Any) -> str:
    """Fit 2 steps with a DipMonitor probing every step; returns the history file's text after strict checks."""
    monitor = DipMonitor(env.tiny_pairs, every_n_steps=1, lenses=("logit",), log_figures=False)
    bare_trainer(env, 2, monitor).fit(module, data)
    last = monitor.history[-1]
    assert math.isnan(last["dip/logit/max_wrong_dip"]) and math.isnan(last["dip/logit/commit_layer_frac"])
    assert math.isnan(last["dip/logit/accuracy"])
    text = (env.tmp / "dip_history.json").read_text()
    strict_json(text)
    return text


def diverged_lora_fit(env: Env) -> str:
    """lr=1e9: the residuals overflow the final norm, every margin is exactly 0 (finite)."""
    module = tiny_module(env, lr=1e9)
    return fit_with_monitor(
        env, module, PairDataModule(train=str(env.pairs_file), val=[str(env.pairs_file)], batch_size=4, prompt="raw")
    )


def nan_weights_fit(env: Env) -> str:
    data = DataLoader(list(torch.randint(2, 40, (4, 12), generator=torch.Generator().manual_seed(0))))
    return fit_with_monitor(env, NaNStepModule(env.tokenizer), data)


def strict_json(text: str) -> Any:
    """Parse ``text`` as strict JSON: ``NaN``/``Infinity`` literals are errors."""

    def reject(constant: str) -> Any:
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=reject)


# -- JSON artifacts --------------------------------------------------------------------------------------


def write_non_finite(env: Env) -> str:
    path = write_json(env.tmp / "a.json", {"a": float("nan"), "b": [float("inf"), {"c": -math.inf}], "d": (1.5,)})
    text = path.read_text()
    assert strict_json(text) == {"a": None, "b": [None, {"c": None}], "d": [1.5]}
    return text


def write_killed_before_rename(env: Env) -> None:
    path = write_json(env.tmp / "result.json", {"version": 1})

    def fail(*_args: Any) -> None:
        raise OSError("injected failure between write and rename")

    env.monkeypatch.setattr(artifacts.os, "replace", fail)
    try:
        write_json(path, {"version": 2, "payload": list(range(1000))})
    finally:
        env.monkeypatch.undo()
        assert json.loads(path.read_text()) == {"version": 1}, "the old file must stay intact"
        assert [p.name for p in env.tmp.iterdir()] == ["result.json"], "no temporary or truncated file may remain"


# -- degradations --------------------------------------------------------------------------------------------


def exit_out_of_order(env: Env) -> None:
    model = make_tiny_model("llama")
    first, second = degrade(model, "late_svd", rank=2), degrade(model, "rtn", bits=3)
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)


def body_changes_dtype(env: Env) -> None:
    model = make_tiny_model("llama")
    with degrade(model, "rtn", bits=3):
        model.half()


# -- training health ---------------------------------------------------------------------------------------


def fit_with_health(env: Env, module: pl.LightningModule, data: Any, **health: Any) -> None:
    """Fit up to 30 steps with only :class:`TrainingHealth` attached."""
    bare_trainer(env, 30, TrainingHealth(**health)).fit(module, data)


def nan_loss_fit(env: Env, **health: Any) -> None:
    data = DataLoader(list(torch.randint(2, 40, (4, 12), generator=torch.Generator().manual_seed(0))))
    fit_with_health(env, NaNStepModule(env.tokenizer), data, **health)


def pinned_loss_fit(env: Env) -> None:
    """A zero final-norm weight: every logit is 0, the loss is exactly ln 64 and no gradient reaches the adapter,
    so even lr=1e9 leaves it pinned (a planted ln V plateau that does not depend on how huge steps overflow)."""
    data = PairDataModule(train=str(env.pairs_file), val=[str(env.pairs_file)], batch_size=4, prompt="raw")
    model = make_tiny_model("llama")
    with torch.no_grad():
        model.model.norm.weight.zero_()
    module = DipRegModule(model=model, tokenizer=env.tokenizer, r=4, alpha=8, aux_losses=[], lr=1e9)
    fit_with_health(env, module, data, diverged_steps=3)


# -- commands: every option is checked before the output folder is made and the model loads -------------------


def refused_before_loading(command: str, *options: str | Callable[[Env], str]) -> Callable[[Env], int]:
    """``dipreg COMMAND --model /nonexistent OPTIONS --out OUT``: the exit code. The bad option must be refused
    first (else the missing model would be the error) and OUT must not exist afterwards. An option given as a
    function of the environment is a file it writes (its path is passed)."""

    def run(env: Env) -> int:
        out = env.tmp / "out"
        model = (
            ["--models", "/nonexistent:/nonexistent-instruct"] if command == "ladder" else ["--model", "/nonexistent"]
        )
        argv = [*command.split(), *model, *(o(env) if callable(o) else o for o in options), "--out", str(out)]
        code = main(argv)
        assert not out.exists(), f"{out} was created by a command whose options were refused"
        return code

    run.command = command.split()[0]  # type: ignore[attr-defined]  (read by the coverage test)
    return run


def missing_file(name: str) -> Callable[[Env], str]:
    return lambda env: str(env.tmp / name)


def text_file(name: str, data: bytes) -> Callable[[Env], str]:
    def make(env: Env) -> str:
        (env.tmp / name).write_bytes(data)
        return str(env.tmp / name)

    return make


# -- dipreg fit: recipes, config files and step limits ----------------------------------------------------------


def fit_config(data: bytes, *flags: str, option: str = "--config") -> Callable[[Env], int]:
    """``dipreg fit --config bad-recipe.yaml FLAGS`` (relative to the row's folder, so messages are stable)."""

    def run(env: Env) -> int:
        env.monkeypatch.chdir(env.tmp)
        (env.tmp / "bad-recipe.yaml").write_bytes(data)
        return main(["fit", option, "bad-recipe.yaml", "--model", "/nonexistent", *flags])

    return run


def fit_flags(*flags: str) -> Callable[[Env], int]:
    """``dipreg fit --recipe output_only --model /nonexistent FLAGS``: a refused flag comes before the model."""

    def run(env: Env) -> int:
        root = env.tmp / "fit"
        return main(
            [
                "fit",
                "--recipe",
                "output_only",
                "--model",
                "/nonexistent",
                *flags,
                "--trainer.default_root_dir",
                str(root),
            ]
        )

    return run


# -- dipreg arms: the settings record of a resumed run ----------------------------------------------------------


def arms_resume(config_text: str | Callable[[], dict[str, Any]], *flags: str) -> Callable[[Env], int]:
    """``dipreg arms --quick FLAGS`` into a folder whose ``arms_config.json`` is ``config_text`` (or the JSON of
    ``config_text()``): refused before any model loads."""

    def run(env: Env) -> int:
        out = env.tmp / "arms"
        out.mkdir()
        text = config_text if isinstance(config_text, str) else json.dumps(config_text())
        (out / "arms_config.json").write_text(text)
        return main(["arms", "--quick", "--model", "/nonexistent", *flags, "--out", str(out)])

    return run


def quick_config() -> dict[str, Any]:
    """The ``arms_config.json`` of ``dipreg arms --quick --model /nonexistent``."""
    return {"model": "/nonexistent", "quick": True, "settings": ArmsSettings.quick().as_dict()}


# -- the HF Trainer callback's history ------------------------------------------------------------------------


def hf_history_with_nan(env: Env) -> str:
    """End an HF run whose probe history holds a NaN (a diverged model): the history file must be strict JSON."""
    from dipreg.callbacks.hf import DipMonitorCallback

    monitor = DipMonitorCallback(env.tiny_pairs, tokenizer=env.tokenizer, lenses=("logit",))
    monitor.history = [
        {"step": 0.0, "dip/logit/max_wrong_dip": 0.5},
        {"step": 1.0, "dip/logit/max_wrong_dip": math.nan},
    ]
    args = SimpleNamespace(output_dir=str(env.tmp / "hf"))
    monitor.on_train_end(args, SimpleNamespace(is_world_process_zero=True), SimpleNamespace())
    text = (env.tmp / "hf" / "dip_history.json").read_text()
    strict_json(text)
    return text


# -- the table -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One bad input: ``run(env)`` and what it must give.

    ``expect``: an exception type (``run`` raises it), a warning type (``run`` warns), an int (``run`` is a CLI call
    returning that exit code; the message is read from stderr), or ``None`` (``run`` returns an artifact's text).
    ``fragment``: text the message (or artifact) must contain; ``absent``: text it must not contain.
    """

    id: str
    run: Callable[[Env], Any]
    expect: type[BaseException] | int | None
    fragment: str
    absent: tuple[str, ...] = ()


SAME = "Question : is it wrong to steal ? Answer :"

# fmt: off
ROWS = [
    # 1. stimuli through `dipreg audit --pairs FILE` (exit code 2, one `error:` line naming file, line, id, field)
    Row("pairs-identical-contexts", audit_pairs(record(id="same", ctx_a=SAME, ctx_b=SAME)), 2,
        "pairs.jsonl:1 (id 'same'): ctx_a and ctx_b are identical"),
    Row("pairs-contexts-differ-only-in-whitespace", audit_pairs(record(ctx_b=SAME.replace(" ?", "  ?") + " ")), 2,
        "pairs.jsonl:1 (id 'p1'): ctx_a and ctx_b are identical up to whitespace"),
    Row("pairs-empty-context", audit_pairs(GOOD, record(id="p2", ctx_a="")), 2,
        "pairs.jsonl:2 (id 'p2'): field 'ctx_a' is empty"),
    Row("pairs-whitespace-context", audit_pairs(record(ctx_b=" \t ")), 2,
        "pairs.jsonl:1 (id 'p1'): field 'ctx_b' is whitespace only"),
    Row("pairs-empty-family", audit_pairs(record(family="")), 2, "pairs.jsonl:1 (id 'p1'): field 'family' is empty"),
    Row("pairs-empty-id", audit_pairs(record(id="")), 2, "pairs.jsonl:1: field 'id' is empty"),
    Row("pairs-not-utf8", audit_pairs(GOOD, b'{"id": "p2", "ctx_a": "caf\xe9"}'), 2,
        "pairs.jsonl:2: not valid UTF-8 (byte 0xe9"),
    Row("pairs-unknown-field", audit_pairs(record(catgory="law")), 2, "(id 'p1'): unknown field 'catgory'"),
    Row("pairs-duplicate-key", audit_pairs('{"id": "p1", "ctx_a": "a", "ctx_a": "b"}'), 2,
        "pairs.jsonl:1: field 'ctx_a' appears twice"),
    Row("pairs-lone-surrogate", audit_pairs(json.dumps(record()).replace("wrong", "\\ud800")), 2,
        "(id 'p1'): field 'ctx_a' is not valid Unicode"),
    Row("pairs-lexical-not-an-object", audit_pairs(record(lexical=[])), 2,
        "(id 'p1'): field 'lexical' must map strings to strings"),
    Row("pairs-huge-integer", audit_pairs('{"id": "p1", "safety": ' + "9" * 5000 + "}"), 2,
        "pairs.jsonl:1: unreadable JSON (Exceeds the limit"),
    Row("pairs-id-closing-markup-tag", audit_pairs(record(id="[/oops]", ctx_a=SAME, ctx_b=SAME)), 2,
        "(id '[/oops]'): ctx_a and ctx_b are identical", absent=("MarkupError",)),
    Row("pairs-id-opening-markup-tag", audit_pairs(record(id="[bold]x", ctx_a=SAME, ctx_b=SAME)), 2,
        "(id '[bold]x'): ctx_a and ctx_b are identical"),
    Row("pair-built-in-python", lambda env: MinimalPair("x", SAME, SAME, " Yes", " No", "f", False), StimulusError,
        "pair (id 'x'): ctx_a and ctx_b are identical"),
    # 2. tuned-lens files through `dipreg audit --lens tuned --tuned-lens FILE`
    Row("lens-garbage-bytes", audit_lens(garbage), 2, "tuned-lens.pt is not a tuned-lens file dipreg can use: format"),
    Row("lens-truncated-zip", audit_lens(truncated), 2, "format: a truncated or damaged zip archive"),
    Row("lens-meta-missing-num-layers", audit_lens(save_blob(lambda b: b["meta"].pop("num_layers"))), 2,
        "metadata field 'num_layers' is missing"),
    Row("lens-meta-bool-width", audit_lens(save_blob(lambda b: b["meta"].update(hidden_size=True))), 2,
        "metadata field 'hidden_size' must be a positive integer, got True"),
    Row("lens-wrong-keys", audit_lens(save_blob(_rename_key)), 2,
        "keys: 1 missing (translators.0.bias), 1 unexpected (translators.0.bias_)"),
    Row("lens-pickle-payload", audit_lens(save_blob(lambda b: b.update(meta=PicklePayload()))), 2,
        "format: it holds Python objects other than tensors", absent=("weights_only", "Traceback")),
    Row("lens-pickle-payload-python-api", load_lens(save_blob(lambda b: b.update(meta=PicklePayload()))),
        TunedLensFileError, "(print), a pickle payload that could run code", absent=("weights_only",)),
    Row("lens-layer-count-vs-metadata", audit_lens(save_blob(_fewer_translators)), 2,
        "layer count: the metadata says 8 layers (7 translators) but the weights hold translators 0..4"),
    Row("lens-width-vs-metadata", audit_lens(save_blob(_narrow)), 2,
        "width: the metadata says width 32 but translators.0.bias has shape (16,) (expected (32,))"),
    Row("lens-nan-weights", audit_lens(save_blob(_nan_weight)), 2, "translators.3.weight holds NaN or infinite"),
    Row("lens-for-another-model", audit_lens(other_model), 2,
        "tuned-lens.pt: This tuned lens was trained for 6 layers of width 32"),
    # 3. checkpoints whose adapter does not match the module (the frozen base is never required)
    Row("ckpt-all-layers-into-late-quarter", load_checkpoint({}, {"layers": 0.25}), CheckpointMismatchError,
        "84 weight(s) in it have no place in this module (e.g. model.base_model.model.model.layers.0."),
    Row("ckpt-other-rank", load_checkpoint({"r": 8}, {}), CheckpointMismatchError,
        "the checkpoint has LoRA rank 8, this module r=4"),
    Row("ckpt-other-target-modules", load_checkpoint({"target_modules": ["q_proj", "v_proj"]}, {}),
        CheckpointMismatchError, "80 adapter weight(s) of this module are missing from it"),
    # 4. the monitor on a diverged model, and strict, atomic JSON
    Row("monitor-diverged-lr-1e9", diverged_lora_fit, UserWarning, "logit: 0 non-finite, 4 exactly 0 at every layer"),
    Row("monitor-nan-weights", nan_weights_fit, UserWarning, "logit: 4 non-finite, 0 exactly 0 at every layer"),
    Row("history-json-is-strict", diverged_lora_fit, None, '"dip/logit/max_wrong_dip": null', absent=("NaN",)),
    Row("write-json-non-finite", write_non_finite, None, '"a": null', absent=("NaN", "Infinity")),
    Row("write-json-killed-before-rename", write_killed_before_rename, OSError, "injected failure"),
    # 5. degrade
    Row("degrade-exited-out-of-order", exit_out_of_order, DegradeError,
        "'late_svd:rank=2' was exited while 'rtn:bits=3' (entered after it) was still open"),
    Row("degrade-body-changed-dtype", body_changes_dtype, RestoreError,
        "rtn:bits=3 did not restore the model: model.layers.0.self_attn.q_proj.weight differs from its original"),
    # 6. DipRegModule arguments
    Row("module-rank-true", lambda env: tiny_module(env, r=True), ValueError,
        "r (the LoRA rank) must be an integer >= 1, got True (bool)"),
    Row("module-alpha-text", lambda env: tiny_module(env, alpha="abc"), ValueError,
        "alpha (the LoRA scaling) must be a finite number in (0, inf), got 'abc' (str)"),
    Row("module-dropout-one", lambda env: tiny_module(env, dropout=1.0), ValueError, "dropout must be a finite number"),
    Row("module-lr-nan", lambda env: tiny_module(env, lr=float("nan")), ValueError, "lr must be a finite number"),
    Row("module-layers-true", lambda env: tiny_module(env, layers=True), ValueError, "layers must be 'all' or a"),
    Row("module-empty-targets", lambda env: tiny_module(env, target_modules=[]), ValueError,
        "target_modules must be None (the architecture's defaults) or a non-empty list"),
    # 7. training health: a fit whose loss is NaN or pinned at ln V stops with the step named
    Row("health-nan-loss", lambda env: nan_loss_fit(env, diverged_steps=None), TrainingDivergedError,
        "Training stopped at optimizer step 1 (epoch 0, batch 0): the training loss is nan"),
    Row("health-loss-pinned-at-ln-v", pinned_loss_fit, TrainingDivergedError,
        "Training stopped at optimizer step 3: the training loss has been >= ln V = ln(64) = 4.1589 (the loss of a "
        "uniform guess over the vocabulary) for 3 consecutive steps (1..3; last loss 4.1589) with lr=1e+09"),
    Row("health-no-vocabulary-size", nan_loss_fit, ValueError,
        "TrainingHealth: cannot read the vocabulary size of NaNStepModule (no model.config.vocab_size); pass "
        "vocab_size=V, or diverged_steps=None"),
    Row("health-diverged-steps-zero", fit_flags("--health.diverged_steps", "0"), 2,
        "diverged_steps (--health.diverged_steps) must be an integer >= 1 or None (rule off), got 0"),
    # 8. dipreg fit: step limits and config files, refused before the model loads
    Row("fit-max-steps-minus-one-without-max-epochs", fit_flags("--trainer.max_steps", "-1"), 2,
        "trainer.max_steps=-1 (--trainer.max_steps) means no step limit, so trainer.max_epochs decides when training "
        "ends, and it is not set (Lightning would run 1000 epochs): give --trainer.max_epochs N as well"),
    Row("fit-max-steps-below-minus-one", fit_flags("--trainer.max_steps", "-5"), 2,
        "trainer.max_steps=-5 (--trainer.max_steps): must be a number of optimizer steps >= 0, or -1"),
    Row("fit-config-truncated", fit_config(b"trainer:\n  max_steps: 5\nmodel:\n  lr: [0.1, "), 2,
        "Config file bad-recipe.yaml: not valid YAML (expected the node content, but found '<stream end>' at line 4"),
    Row("fit-config-garbage-bytes", fit_config(random.Random(0).randbytes(300)), 2,
        "Config file bad-recipe.yaml: not UTF-8 text (byte 0: 0xcd)"),
    Row("fit-config-control-character", fit_config(b"trainer:\n  max_steps: 5\x00\n"), 2,
        "Config file bad-recipe.yaml: not valid YAML (character #x0000 at offset 23: special characters are not "
        "allowed)"),
    Row("fit-config-not-a-mapping", fit_config(b"- trainer\n- model\n"), 2,
        "Config file bad-recipe.yaml holds a YAML list, not a mapping"),
    Row("fit-config-unknown-option", fit_config(b"trainer:\n  max_stepz: 5\n"), 2,
        "does not accept option 'trainer.max_stepz' (options read from the config file bad-recipe.yaml and then "
        "the flags)"),
    Row("fit-recipe-file-not-yaml", fit_config(b"model: {lr: 0.1\n", option="--recipe"), 2,
        "Config file bad-recipe.yaml: not valid YAML ("),
    # 9. every command checks its options before it makes --out and loads the model (here: /nonexistent)
    Row("opts-audit-window", refused_before_loading("audit", "--window", "0.9,0.1"), 2,
        "--window=(0.9, 0.1) must satisfy 0 <= lo <= hi <= 1"),
    Row("opts-audit-batch-size", refused_before_loading("audit", "--batch-size", "0"), 2,
        "--batch-size must be an integer >= 1, got 0"),
    Row("opts-audit-unknown-lens", refused_before_loading("audit", "--lens", "logit,bogus"), 2,
        "--lens: unknown lens(es) 'bogus'; choose from: logit, causal, tuned"),
    Row("opts-audit-missing-tuned-lens",
        refused_before_loading("audit", "--lens", "tuned", "--tuned-lens", missing_file("no-lens")), 2,
        "no-lens. Train one with `dipreg tuned-lens train --corpus out-of-domain`"),
    Row("opts-audit-missing-pairs-file", refused_before_loading("audit", "--pairs", missing_file("nope.jsonl")), 2,
        "nope.jsonl' does not exist"),
    Row("opts-degrade-ops", refused_before_loading("degrade", "--ops", "late_svd:rank=0"), 2,
        "late_svd: rank=0 must be a positive integer"),
    Row("opts-degrade-window", refused_before_loading("degrade", "--window", "0.5,1.5"), 2,
        "--window=(0.5, 1.5) must satisfy"),
    Row("opts-bridge-batch-size", refused_before_loading("bridge", "--batch-size", "0"), 2,
        "--batch-size must be an integer >= 1, got 0"),
    Row("opts-bridge-window", refused_before_loading("bridge", "--window", "0.9,0.1"), 2,
        "--window=(0.9, 0.1) must satisfy"),
    Row("opts-bridge-interventions", refused_before_loading("bridge", "--interventions", "shout"), 2, "shout"),
    Row("opts-bench-batch-size", refused_before_loading("bench", "--batch-size", "0"), 2,
        "--batch-size must be an integer >= 1, got 0"),
    Row("opts-bench-missing-pairs-file", refused_before_loading("bench", "--pairs", missing_file("nope.jsonl")), 2,
        "nope.jsonl' does not exist"),
    Row("opts-ladder-limit-zero", refused_before_loading("ladder", "--limit", "0"), 2,
        "--limit must be an integer >= 1 (omit it for all pairs), got 0"),
    Row("opts-ladder-batch-size", refused_before_loading("ladder", "--batch-size", "-2"), 2,
        "--batch-size must be an integer >= 1, got -2"),
    Row("opts-arms-steps-zero", refused_before_loading("arms", "--quick", "--steps", "0"), 2,
        "max_steps (--steps) must be an integer >= 1 (or unset), got 0"),
    Row("opts-arms-monitor-every", refused_before_loading("arms", "--monitor-every", "0"), 2,
        "monitor_every (--monitor-every) must be an integer >= 1, got 0"),
    Row("opts-arms-conditions", refused_before_loading("arms", "--conditions", "clean,late_svd:rnk=64"), 2,
        "conditions (--conditions): "),
    Row("opts-arms-eval-pairs", refused_before_loading("arms", "--eval-pairs", missing_file("nope.jsonl")), 2,
        "eval_pairs (--eval-pairs): Stimulus file"),
    Row("opts-arms-seeds", refused_before_loading("arms", "--seeds", "1,-1"), 2,
        "--seeds: every seed must be an integer >= 0, got -1"),
    Row("opts-tuned-lens-empty-corpus",
        refused_before_loading("tuned-lens train", "--corpus", text_file("corpus.txt", b"\n  \n")), 2,
        "corpus.txt has no non-empty line; put one document per line"),
    Row("opts-tuned-lens-corpus-not-utf8",
        refused_before_loading("tuned-lens train", "--corpus", text_file("corpus.txt", b"caf\xe9\n")), 2,
        "corpus.txt: not UTF-8 text (byte 3: 0xe9)"),
    Row("opts-tuned-lens-steps", refused_before_loading("tuned-lens train", "--corpus", "in-domain", "--steps", "0"),
        2, "steps (--steps) must be an integer >= 1, got 0"),
    # 10. dipreg arms resuming into a folder: its settings record
    Row("arms-config-not-json", arms_resume('{"model": null, "quick": tr'), 2,
        "arms_config.json is not a complete JSON record (Expecting value: line 1 column 26 (char 25)): it records the "
        "settings the runs in"),
    Row("arms-settings-changed", arms_resume(quick_config, "--monitor-every", "3", "--eval-limit", "5"), 2,
        "arms_config.json): monitor_every: 2 → 3; eval_limit: 24 → 5. Resume with the same options, or pass a new "
        "--out"),
    # 11. the HF Trainer callback writes strict JSON
    Row("history-hf-callback-is-strict", hf_history_with_nan, None, '"dip/logit/max_wrong_dip": null',
        absent=("NaN",)),
]
# fmt: on


def one_line(text: str) -> str:
    """``text`` with runs of whitespace (including the line breaks a console inserts) collapsed to one space."""
    return " ".join(text.split())


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_bad_input_is_named(row: Row, env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    if isinstance(row.expect, int):
        assert row.run(env) == row.expect
        err = capsys.readouterr().err
        message = one_line(err)
        assert message.count("error:") == 1 and "Traceback" not in err, err
    elif row.expect is None:
        message = row.run(env)
    elif issubclass(row.expect, Warning):
        with pytest.warns(row.expect) as caught:
            row.run(env)
        message = " | ".join(str(w.message) for w in caught if row.fragment in str(w.message))
        assert message, [str(w.message) for w in caught]
    else:
        with pytest.raises(row.expect) as info:
            row.run(env)
        message = str(info.value)
        assert "\n" not in message, f"not one line: {message!r}"
    assert one_line(row.fragment) in message
    for text in row.absent:
        assert text not in message


#: CLI commands without an ``opts-`` row, and where their bad options are tested instead.
OPTIONS_TESTED_ELSEWHERE = {
    "fit": "the fit-* rows above (LightningCLI parses its options)",
    "prompt-styles": "tests/test_prompt_styles.py",
}


def test_every_command_of_the_cli_has_a_row_refusing_a_bad_option():
    """Against the CLI's own registry: a command added to ``dipreg`` without a bad-option row (or a note where its
    options are tested) fails here; and every ``opts-<command>-`` row runs the command its id names."""
    run_by_row = {row.id: getattr(row.run, "command", None) for row in ROWS if row.id.startswith("opts-")}
    for row_id, command in run_by_row.items():
        assert command is not None and row_id.startswith(f"opts-{command}-"), (row_id, command)
    assert set(run_by_row.values()) | set(OPTIONS_TESTED_ELSEWHERE) == set(COMMANDS)
    assert not set(run_by_row.values()) & set(OPTIONS_TESTED_ELSEWHERE)


# -- property-style tests of the stimulus loader -------------------------------------------------------------


def random_text(rng: random.Random) -> str:
    pools = [
        string.printable,
        "äöü ßçñ 日本語 中文 한국어 עברית العربية",
        "\U0001f600\U0001f680\u200b\u200d\u0301\ufeff\u2028\u2029",
        "\x00\x01\x1f\x7f",
    ]
    pool = rng.choice(pools)
    return "".join(rng.choice(pool) for _ in range(rng.randint(0, 30)))


def random_json_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(12 if depth < 4 else 8)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 2**31, -(2**63), 10**300])
    if kind == 3:
        return rng.choice([0.0, -0.0, 1.5, 1e308, -1e-320, math.nan, math.inf, -math.inf])
    if kind in (4, 5, 6):
        return random_text(rng)
    if kind == 7:
        return rng.choice(["", " ", "\t\n", " Yes", "x" * 5000])
    if kind in (8, 9):
        return [random_json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {random_text(rng): random_json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


RAW_LINES = [
    '{"id": "p1", "safety": ' + "1" * 6000 + "}",  # an integer too long for Python to convert
    "[" * 100_000 + "]" * 100_000,  # nesting deeper than the parser's recursion limit
    '{"id": "p1", "ctx_a": NaN, "ctx_b": Infinity}',
    '{"id": "\\ud800"}',
    '{"id": "p1", "id": "p2"}',
    "\ufeff" + json.dumps(GOOD),
    "null",
    '"just a string"',
    "12",
]


def check_load(path: Path) -> list[MinimalPair] | None:
    """``load_pairs(path)``: the pairs, or None after checking that the error is a one-line StimulusError naming
    the file; any other exception fails the test."""
    try:
        pairs = load_pairs(path)
    except StimulusError as err:
        message = str(err)
        assert str(path) in message and "\n" not in message, message
        return None
    assert pairs and all(isinstance(p, MinimalPair) for p in pairs)
    assert load_pairs(save_pairs(pairs, path.with_suffix(".again.jsonl"))) == pairs  # what loads also round-trips
    return pairs


def test_random_bytes_files_raise_only_stimulus_errors(tmp_path):
    rng = random.Random(1234)
    loaded = 0
    for case in range(300):
        path = tmp_path / f"bytes-{case}.jsonl"
        if case % 3 == 0:
            data = rng.randbytes(rng.randint(0, 400))
        elif case % 3 == 1:  # a valid line with random bytes spliced in
            good = json.dumps(GOOD).encode()
            cut = rng.randint(0, len(good))
            data = good[:cut] + rng.randbytes(rng.randint(1, 8)) + good[cut:]
        else:  # valid lines, one of them randomly flipped
            lines = [json.dumps(record(id=f"p{i}")).encode() for i in range(3)]
            line = bytearray(lines[1])
            line[rng.randrange(len(line))] = rng.randrange(256)
            lines[1] = bytes(line)
            data = b"\n".join(lines)
        path.write_bytes(data)
        loaded += check_load(path) is not None
    assert loaded < 300  # most random files are rejected (the rest loaded and round-tripped)


@pytest.mark.parametrize("field", [*GOOD, "lexical", "unknown_field"])
def test_random_json_values_per_field_raise_only_stimulus_errors(tmp_path, field):
    rng = random.Random(sum(map(ord, field)))
    outcomes = set()
    for case in range(40):
        rec = dict(GOOD)
        if case == 0 and field in GOOD:
            del rec[field]  # the field missing
        else:
            rec[field] = random_json_value(rng)
        path = tmp_path / f"{field}-{case}.jsonl"
        path.write_text(
            json.dumps(rec, ensure_ascii=rng.random() < 0.5) + "\n", encoding="utf-8", errors="surrogatepass"
        )
        outcomes.add(check_load(path) is not None)
    assert False in outcomes  # every field has values the loader refuses


@pytest.mark.parametrize("line", RAW_LINES, ids=range(len(RAW_LINES)))
def test_hand_made_hostile_lines_raise_only_stimulus_errors(tmp_path, line):
    path = tmp_path / "hostile.jsonl"
    path.write_text(line + "\n", encoding="utf-8")
    pairs = check_load(path)
    assert pairs is None or [p.id for p in pairs] == ["p1"]  # only the BOM line is valid
