"""Shared fixtures: tiny randomly initialised models of every supported architecture, a tiny word-level
tokenizer for them, hand-made minimal pairs, and (session-scoped) the real embedded default model."""

from __future__ import annotations

import os

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


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer: every word of :data:`WORDS` is one token, leading spaces are dropped."""
    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


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


ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gpt2", "gpt_neox")


def make_tiny_model(arch: str, seed: int = 0):
    """A tiny randomly initialised causal LM (8 layers, width 32) in eval mode, float32."""
    torch.manual_seed(seed)
    config = _tiny_config(arch)
    config.initializer_range = 0.2  # larger than default so margins are far from zero
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


@pytest.fixture(params=ARCHITECTURES)
def tiny_model(request):
    """One tiny model per supported architecture."""
    return make_tiny_model(request.param)


@pytest.fixture
def llama_tiny():
    """A tiny Llama, the architecture of the default model."""
    return make_tiny_model("llama")


@pytest.fixture(scope="session")
def tiny_pairs() -> list[MinimalPair]:
    """Hand-made minimal pairs whose words are all in the tiny tokenizer, of varied lengths."""
    return [
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
    ]


@pytest.fixture(scope="session")
def fresh_interpreter(tmp_path_factory) -> dict[str, str | None]:
    """The import-isolation report of ``tests/fresh_interpreter.py``, run once per session in a fresh interpreter:
    ``{check: None}`` when a check held, else its traceback."""
    from tests.fresh_interpreter import run

    return run(tmp_path_factory.mktemp("fresh-interpreter"))


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
