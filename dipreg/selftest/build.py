"""Seeded random-weight models and a word-level tokenizer for the self-check (no network, no model files)."""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerFast

from dipreg.lenses.causal import DEFAULT_NEUTRAL_PROMPT
from dipreg.stimuli import MinimalPair

#: Tiny configs of every supported architecture (8 layers, width 32), as the unit tests build them.
_COMMON = {"hidden_size": 32, "num_attention_heads": 4, "max_position_embeddings": 128}
_GATED = {**_COMMON, "intermediate_size": 64, "num_hidden_layers": 8, "num_key_value_heads": 2}
TINY: dict[str, dict] = {
    "llama": _GATED,
    "mistral": _GATED,
    "qwen2": _GATED,
    "qwen3": {**_GATED, "head_dim": 8},
    "gemma2": {**_GATED, "head_dim": 8, "final_logit_softcapping": 0.5, "tie_word_embeddings": True},
    "gpt2": {"n_embd": 32, "n_head": 4, "n_layer": 8, "n_positions": 128},
    "gpt_neox": {**_COMMON, "intermediate_size": 64, "num_hidden_layers": 8, "tie_word_embeddings": False},
}


def words_of(texts: Iterable[str]) -> list[str]:
    """The distinct words and punctuation marks of ``texts``, in order of first appearance."""
    seen: dict[str, None] = {}
    for text in texts:
        for word in re.findall(r"\w+|[^\w\s]", text):
            seen.setdefault(word, None)
    return list(seen)


def word_tokenizer(pairs: Iterable[MinimalPair]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer in which every word of ``pairs`` (and of the causal lens's neutral prompt) is one
    token: candidates like ``" Yes"`` are single tokens, as the audit requires."""
    pairs = list(pairs)
    texts = [t for p in pairs for t in (p.ctx_a, p.ctx_b, p.t_pos, p.t_neg)] + [DEFAULT_NEUTRAL_PROMPT]
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *words_of(texts)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def tiny_config(arch: str, vocab_size: int) -> PretrainedConfig:
    """The tiny config of ``arch`` (a model type of :data:`TINY`) with ``vocab_size`` tokens."""
    config = AutoConfig.for_model(arch, vocab_size=vocab_size, **TINY[arch])
    config.initializer_range = 0.2  # margins far from zero
    return config


def random_model(
    config: PretrainedConfig,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    draw_on_device: bool = False,
):
    """The causal LM of ``config`` with weights drawn from ``seed``, in ``dtype`` on ``device``, in eval mode.

    The weights are drawn in float32 by the CPU generator and then moved and cast, so every device gets the weights
    the CPU reference gets (a CUDA generator seeded alike draws other numbers: the first GPU run of the self-check
    compared two different models). ``draw_on_device=True`` builds directly on ``device`` instead (fast for a
    billions-of-parameters timing model, whose values do not matter; never for a parity check)."""
    torch.manual_seed(seed)
    if draw_on_device:
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.to(device=device, dtype=dtype).eval()
