"""Shared fixtures: tiny randomly initialised models of every supported architecture, a tiny word-level
tokenizer for them, hand-made minimal pairs, and (session-scoped) the real embedded default model."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from dipreg.stimuli import MinimalPair

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = [
    "[PAD]",
    "[UNK]",
    "Yes",
    "No",
    "True",
    "False",
    "Alice",
    "Bob",
    "is",
    "it",
    "right",
    "wrong",
    "good",
    "bad",
    "to",
    "steal",
    "help",
    "Question",
    "Answer",
    "Statement",
    "the",
    "a",
    "cat",
    "dog",
    "chased",
    "was",
    "by",
    "Who",
    "?",
    ":",
    ".",
    ",",
    "ice",
    "cold",
    "hot",
    "not",
    "fire",
    "king",
    "hello",
    "1135",
    "and",
    "or",
]


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer: every word of :data:`WORDS` is one token, leading spaces are dropped."""
    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """:func:`make_tiny_tokenizer`, built once per session."""
    return make_tiny_tokenizer()


def _tiny_config(arch: str):
    vocab = 64
    common = {"vocab_size": vocab, "hidden_size": 32, "num_attention_heads": 4, "max_position_embeddings": 64}
    if arch == "llama":
        return LlamaConfig(**common, intermediate_size=64, num_hidden_layers=8, num_key_value_heads=2)
    if arch == "qwen2":
        return Qwen2Config(**common, intermediate_size=64, num_hidden_layers=8, num_key_value_heads=2)
    if arch == "qwen3":  # per-head q/k RMSNorm, explicit head_dim
        return Qwen3Config(**common, intermediate_size=64, num_hidden_layers=8, num_key_value_heads=2, head_dim=8)
    if arch == "mistral":
        # A sliding window shorter than every test context: without it a Mistral is a Llama with another name
        # (same weights from the same seed, same margins), and the window's masking would go untested.
        return MistralConfig(
            **common, intermediate_size=64, num_hidden_layers=8, num_key_value_heads=2, sliding_window=4
        )
    if arch == "gemma2":
        return Gemma2Config(
            **common,
            intermediate_size=64,
            num_hidden_layers=8,
            num_key_value_heads=2,
            head_dim=8,
            final_logit_softcapping=0.5,
            tie_word_embeddings=True,
        )
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=32, n_head=4, n_layer=8, n_positions=64)
    if arch == "gpt_neox":
        return GPTNeoXConfig(**common, intermediate_size=64, num_hidden_layers=8, tie_word_embeddings=False)
    raise ValueError(arch)


#: Extras whose install line is more than ``pip install 'dipreg[EXTRA]'`` (README, install section).
EXTRA_INSTALL = {
    "calib": "pip install 'dipreg[calib]' && pip install --no-deps llmcompressor==0.14.0.1",
    "hqq": "DISABLE_CUDA=1 pip install 'dipreg[hqq]'",
}


def requires_extra(module: str, extra: str) -> pytest.MarkDecorator:
    """The one skip policy for optional packages: a ``skipif`` mark that skips a test needing ``module`` when it is
    not installed, with the install line of the extra that brings it (``needs the quant extra: pip install
    'dipreg[quant]'``). A test of what happens WITHOUT the package does not use it: it simulates the absence.

    Example:
        >>> @requires_extra("bitsandbytes", "quant")  # doctest: +SKIP
        ... def test_nf4(): ...
    """
    install = EXTRA_INSTALL.get(extra, f"pip install 'dipreg[{extra}]'")
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"needs the {extra} extra: {install}")


#: The optional library (module, extra) each degradation operator that needs one runs through.
OPERATOR_LIBRARIES = {
    "nf4": ("bitsandbytes", "quant"),
    "int8": ("bitsandbytes", "quant"),
    "hqq": ("hqq", "hqq"),
    "gptq": ("llmcompressor", "calib"),
    "awq": ("llmcompressor", "calib"),
}


def operator_param(op: str, *values: object) -> Any:
    """The test parameter ``(op, *values)`` (or ``op`` alone), skipped by :func:`requires_extra` when the optional
    library ``op`` runs through is not installed."""
    marks = [requires_extra(*OPERATOR_LIBRARIES[op])] if op in OPERATOR_LIBRARIES else []
    return pytest.param(op, *values, marks=marks)


def saved_figures(monkeypatch: pytest.MonkeyPatch, *modules: Any) -> dict[str, Any]:
    """Spy on ``save_figure`` as each of ``modules`` imported it: the returned dict fills, as the code under test
    saves, with file name -> the matplotlib ``Figure`` it saved, so a test reads the plotted data back (line and
    bar values) instead of trusting a file size. Pair with :func:`assert_png_of`."""
    saved: dict[str, Any] = {}
    for module in modules:

        def spy(fig: Any, path: Any, real: Any = module.save_figure) -> Any:
            saved[Path(path).name] = fig
            return real(fig, path)

        monkeypatch.setattr(module, "save_figure", spy)
    return saved


def assert_png_of(path: Path, fig: Any, dpi: int = 120) -> None:
    """``path`` is a PNG of ``fig``: its pixel size is the figure's size in inches times ``dpi``."""
    from matplotlib.image import imread

    height, width = imread(path).shape[:2]
    want_width, want_height = (fig.get_size_inches() * dpi).round().astype(int)
    assert (width, height) == (want_width, want_height), f"{path.name}: {width}x{height} pixels"


ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gpt2", "gpt_neox")


def make_tiny_model(arch: str, seed: int = 0):
    """A tiny randomly initialised causal LM (8 layers, width 32) in eval mode, float32."""
    torch.manual_seed(seed)
    config = _tiny_config(arch)
    config.initializer_range = 0.2  # larger than default so margins are far from zero
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def quiet_training_args(output_dir: Path, max_steps: int, batch_size: int = 2) -> Any:
    """HF ``TrainingArguments`` for a short CPU run that logs nothing but what a callback under test writes:
    learning rate 0 (the weights stay as given), no reporting, no checkpoints, no progress bar."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        learning_rate=0.0,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )


def quiet_trainer(root: Path, callbacks: list, **kwargs: Any) -> Any:
    """A one-process CPU Lightning ``Trainer`` writing under ``root`` with no progress bar, model summary or logger
    unless ``kwargs`` (any other ``Trainer`` argument) say otherwise."""
    import lightning.pytorch as pl

    options = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False, **kwargs}
    return pl.Trainer(default_root_dir=root, accelerator="cpu", devices=1, callbacks=callbacks, **options)


@pytest.fixture(params=ARCHITECTURES)
def tiny_model(request):
    """One tiny model per supported architecture."""
    return make_tiny_model(request.param)


@pytest.fixture
def llama_tiny():
    """A tiny Llama, the architecture of the default model."""
    return make_tiny_model("llama")


#: Hand-made minimal pairs whose words are all in the tiny tokenizer, of varied lengths.
TINY_PAIRS: tuple[MinimalPair, ...] = (
    MinimalPair(
        id="neg-0",
        ctx_a="Statement : ice is cold . True or False ? Answer :",
        ctx_b="Statement : ice is not cold . True or False ? Answer :",
        t_pos=" True",
        t_neg=" False",
        family="negation",
        safety=False,
    ),
    MinimalPair(
        id="val-0",
        ctx_a="Question : is it wrong to steal ? Yes or No ? Answer :",
        ctx_b="Question : is it right to steal ? Yes or No ? Answer :",
        t_pos=" Yes",
        t_neg=" No",
        family="value_flip",
        safety=True,
        category="law",
    ),
    MinimalPair(
        id="role-0",
        ctx_a="Alice chased Bob . Who chased ? Answer :",
        ctx_b="Alice was chased by Bob . Who chased ? Answer :",
        t_pos=" Alice",
        t_neg=" Bob",
        family="role_binding",
        safety=False,
    ),
    MinimalPair(
        id="val-1",
        ctx_a="is it good to help ?",
        ctx_b="is it bad to help ?",
        t_pos=" Yes",
        t_neg=" No",
        family="value_flip",
        safety=False,
    ),
)


@pytest.fixture(scope="session")
def tiny_pairs() -> list[MinimalPair]:
    """:data:`TINY_PAIRS` as a list."""
    return list(TINY_PAIRS)


#: Child processes that tests read (import isolation, the two-process fits, the CPU self-check), each run to its end
#: by :func:`_run_children` on a thread started as soon as the selected tests are known (``pytest_collection_finish``).
#: The fast tier runs torch on one thread, so the children take the other core instead of waiting for their test. They
#: run ONE AT A TIME, in :data:`BACKGROUND_RUNNERS` order (roughly the order their tests come in): started together
#: they were seven processes on two cores and slowed the tests beside them for a minute. Keyed by the fixture that reads
#: them (the fixtures live here: a test module's ``tests.conftest`` is another module object).
BACKGROUND: dict[str, Future] = {}

#: One worker: the children run one after another.
_BACKGROUND_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dipreg-tests-background")

#: Every child process started, so that a session cut short can stop them.
BACKGROUND_PROCS: list[subprocess.Popen] = []

#: The temporary folders the children write to, removed at the end of the session.
BACKGROUND_DIRS: list[Path] = []


def _background_dir(prefix: str) -> Path:
    BACKGROUND_DIRS.append(Path(tempfile.mkdtemp(prefix=prefix)))
    return BACKGROUND_DIRS[-1]


def _run_fresh_interpreter() -> dict[str, str | None]:
    from tests import fresh_interpreter

    proc = fresh_interpreter.start(_background_dir("dipreg-fresh-"))
    BACKGROUND_PROCS.append(proc)
    return fresh_interpreter.finish(proc)


def _run_ranks(prefix: str, start: Callable[[Path], list[subprocess.Popen]]) -> Path:
    from tests import sharded_run

    out = _background_dir(prefix)
    ranks = start(out)
    BACKGROUND_PROCS.extend(ranks)
    sharded_run.finish(ranks)
    return out


def _run_two_ranks() -> Path:
    from tests import sharded_run

    return _run_ranks("dipreg-two-ranks-", lambda out: sharded_run.start(list(sharded_run.JOBS), out))


def _run_alert_ranks() -> Path:
    from tests import sharded_run

    script = Path(__file__).parent / "dip_alert_run.py"
    return _run_ranks("dipreg-alert-ranks-", lambda out: sharded_run.launch(script, [str(out)]))


def _run_cpu_selftest() -> tuple[int, str, Path]:
    """``python -m dipreg.selftest --device cpu --sizes tiny --architectures llama,gpt2`` as a user runs it: the exit
    code, the output, and the folder holding ``selftest.json``."""
    out = _background_dir("dipreg-selftest-")
    command = [sys.executable, "-m", "dipreg.selftest", "--device", "cpu", "--sizes", "tiny"]
    command += ["--architectures", "llama,gpt2", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    BACKGROUND_PROCS.append(proc)
    output = proc.communicate(timeout=600)[0]
    return proc.returncode, output, out


def _run_memory_worker() -> tuple[int, str, str]:
    """``tests/hungry_worker.py`` in a fresh interpreter: its exit code, stdout and stderr (``test_bench_peers``)."""
    out = _background_dir("dipreg-hungry-")
    command = [sys.executable, str(Path(__file__).parent / "hungry_worker.py"), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    BACKGROUND_PROCS.append(proc)
    stdout, stderr = proc.communicate(timeout=300)
    return proc.returncode, stdout, stderr


#: fixture name -> the function that runs its child to the end and returns the fixture's value; in run order.
BACKGROUND_RUNNERS: dict[str, Callable[[], Any]] = {
    "memory_worker": _run_memory_worker,
    "fresh_interpreter": _run_fresh_interpreter,
    "alert_ranks": _run_alert_ranks,
    "cpu_selftest": _run_cpu_selftest,
    "two_ranks": _run_two_ranks,
}


def pytest_collection_finish(session: pytest.Session) -> None:
    """Queue the child of every background fixture that a selected test uses."""
    wanted = {name for item in session.items for name in getattr(item, "fixturenames", ())}
    for name in BACKGROUND_RUNNERS:
        if name in wanted:
            background(name)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Drop the children not started yet, stop any still running (a session cut short), remove their folders."""
    _BACKGROUND_POOL.shutdown(wait=False, cancel_futures=True)
    for proc in BACKGROUND_PROCS:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for folder in BACKGROUND_DIRS:
        shutil.rmtree(folder, ignore_errors=True)


def background(name: str) -> Future:
    """The run of background fixture ``name``: queued at collection, else queued now (``.result()`` waits for it and
    raises what it raised)."""
    if name not in BACKGROUND:
        BACKGROUND[name] = _BACKGROUND_POOL.submit(BACKGROUND_RUNNERS[name])
    return BACKGROUND[name]


@pytest.fixture(scope="session")
def fresh_interpreter() -> dict[str, str | None]:
    """The import-isolation report of ``tests/fresh_interpreter.py``, run once per session in a fresh interpreter:
    ``{check: None}`` when a check held, else its traceback."""
    return background("fresh_interpreter").result()


@pytest.fixture(scope="session")
def two_ranks() -> Path:
    """``tests/test_sharded_probe.py``'s two-process run of ``tests/sharded_run.py`` (each rank fits DDP, then
    FSDP2, then the ``health`` DDP fit): the folder holding ``<job>/rank<r>.json``."""
    return background("two_ranks").result()


@pytest.fixture(scope="session")
def alert_ranks() -> Path:
    """``tests/test_dip_alert.py``'s two-process DDP run of ``tests/dip_alert_run.py`` (each rank fits planted,
    healthy, then split): the folder holding ``<fit>/rank<r>.json``."""
    return background("alert_ranks").result()


@pytest.fixture(scope="session")
def cpu_selftest() -> tuple[int, str, Path]:
    """``python -m dipreg.selftest --device cpu --sizes tiny --architectures llama,gpt2``, run once per session in a
    child process: its exit code, its output and its ``--out`` folder."""
    return background("cpu_selftest").result()


@pytest.fixture(scope="session")
def default_model():
    """The real embedded default model (SmolLM2-135M-Instruct) and tokenizer, loaded once per session."""
    from dipreg.models import load_model

    return load_model()


class DefaultModelInUnitTest(RuntimeError):
    """A test without the ``integration`` marker tried to load the real default model."""


@pytest.fixture(autouse=True)
def _unit_tests_stay_small(request, monkeypatch):
    """Two guards for every test without the ``integration`` marker (the fast tier, ``-m "not integration"``):

    - it may not load the real default model: the loader raises, and the test fails at teardown even when the code
      under test caught the error (a CLI turns it into exit code 2);
    - it runs torch on one thread: tiny models gain nothing from a second one, and on a shared, loaded machine
      OpenMP's spin-waiting makes two-thread runs of tiny models many times slower (the fast tier took minutes
      longer). Integration tests keep torch's default.
    """
    if "integration" in request.keywords:
        yield
        return
    if "default_model" in request.fixturenames:
        pytest.fail("this test uses the default_model fixture but is not marked @pytest.mark.integration")
    from dipreg import models

    attempts: list[str] = []

    def refuse() -> None:
        attempts.append(request.node.nodeid)
        raise DefaultModelInUnitTest(
            f"{request.node.nodeid} loads the real default model but is not marked @pytest.mark.integration"
        )

    monkeypatch.setattr(models, "_converted_default_dir", refuse)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
    if attempts:
        pytest.fail(f"loads the real default model without @pytest.mark.integration ({len(attempts)} time(s))")


@pytest.fixture(scope="session")
def memory_worker() -> tuple[int, str, str]:
    """``tests/hungry_worker.py`` run once per session in a fresh interpreter: its exit code, its stdout (the last
    line the JSON of ``peers_worker.measure``) and its stderr."""
    return background("memory_worker").result()
