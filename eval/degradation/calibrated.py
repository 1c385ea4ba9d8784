"""Calibrated quantization (GPTQ, AWQ) through llmcompressor, as the dequantized weights it leaves in a model.

llmcompressor's ``oneshot`` quantizes a model in place and keeps each quantized weight in float, already rounded
to its grid (fake quantization): exactly what a degradation operator needs. It runs here on a deep copy of the
causal LM, never on the live model (see :func:`calibrated_state`), and the operator writes the changed tensors
back through its :class:`~dipreg.eval.degradation.ledger.Ledger`, so the live model is restored bit-exactly.

Calibration text is the corpus shipped with dipreg (``dipreg/stimuli/data/calibration_text.json``; not the
held-out NLL corpus of ``dipreg arms``): its paragraphs are shuffled with ``seed``, joined, tokenized and cut into
``samples`` windows of ``seq_len`` tokens. The result is cached per (model checksum, method, options, calibration
tokens, library versions) under ``$DIPREG_CACHE/calibrated`` (:func:`dipreg.models.cache_dir`).

llmcompressor 0.14 pins ``transformers<=5.17`` in its metadata but runs GPTQ and AWQ under dipreg's transformers
(5.25) on the CPU; it is installed without its dependencies (README, "Calibrated quantization").
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from importlib import metadata, resources
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from dipreg.adapter import ModelAdapter
from dipreg.eval.degradation.layouts import base_layer, block_linears, is_peft_wrapped
from dipreg.eval.degradation.ledger import state_checksum
from dipreg.models import cache_dir

#: Operators computed by llmcompressor, with the modifier each one runs.
CALIBRATED_OPS: dict[str, str] = {"gptq": "GPTQModifier", "awq": "AWQModifier"}
#: What to install when llmcompressor is missing (its metadata pins an older transformers: no dependencies).
CALIB_EXTRA = "pip install 'dipreg[calib]' && pip install --no-deps llmcompressor==0.14.0.1"
#: The libraries whose versions enter the cache key.
_LIBRARIES = ("llmcompressor", "compressed-tensors", "torch", "transformers")


@cache
def _llmcompressor() -> ModuleType | None:
    """The ``llmcompressor`` package, or ``None`` when it (or one of its imports) is not installed."""
    try:
        from loguru import logger

        logger.disable("llmcompressor")  # its log lines (from the import on) would flood every `dipreg degrade` table
        import llmcompressor
    except ImportError:
        return None
    logger.disable("llmcompressor")  # again: importing it configures its logger, enabled
    return llmcompressor


def llmcompressor_problem(op: str) -> str | None:
    """Why ``op`` cannot run here (llmcompressor missing), in one line, or ``None``; ``None`` for other operators."""
    if op in CALIBRATED_OPS and _llmcompressor() is None:
        return f"{op} runs through llmcompressor, which is not installed: {CALIB_EXTRA}"
    return None


def awq_problem(causal_lm: nn.Module) -> str | None:
    """Why AWQ cannot run on ``causal_lm`` (llmcompressor has no smoothing mappings for its class), or ``None``."""
    from llmcompressor.modifiers.transform.awq.mappings import AWQ_MAPPING_REGISTRY

    name = type(causal_lm).__name__
    if name in AWQ_MAPPING_REGISTRY:
        return None
    return (
        f"awq: llmcompressor has no AWQ smoothing mappings for {name} (it would fail half-way); use gptq or hqq on "
        "this model, or one of the architectures llmcompressor maps (Llama, Mistral, Qwen2/3, Gemma2 and others)."
    )


def calibration_texts() -> list[str]:
    """The paragraphs of the calibration corpus shipped with dipreg."""
    data = resources.files("dipreg.stimuli").joinpath("data/calibration_text.json").read_text()
    return list(json.loads(data)["texts"])


def calibration_ids(tokenizer: Any, samples: int, seq_len: int, seed: int, op: str = "calibration") -> Tensor:
    """``(samples, seq_len)`` token ids: the corpus paragraphs shuffled with ``seed``, joined by blank lines,
    tokenized without special tokens and cut into consecutive windows. Raises ``ValueError`` naming what fits
    when the corpus is too short."""
    texts = calibration_texts()
    random.Random(seed).shuffle(texts)
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    if samples * seq_len > len(ids):
        raise ValueError(
            f"{op}: samples={samples} × seq_len={seq_len} needs {samples * seq_len} calibration tokens; the "
            f"calibration corpus has {len(ids)} with this tokenizer. Lower samples or seq_len."
        )
    return torch.tensor(ids[: samples * seq_len]).reshape(samples, seq_len)


def _scheme(op: str, bits: int, group_size: int | None) -> Any:
    """The weight-only quantization scheme: signed int ``bits``, per group of ``group_size`` inputs (``None``: per
    output channel); symmetric for GPTQ (llmcompressor's W4A16 preset), asymmetric for AWQ (its W4A16_ASYM)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(
        num_bits=bits,
        type="int",
        symmetric=op == "gptq",
        strategy="channel" if group_size is None else "group",
        group_size=group_size,
    )
    return QuantizationScheme(targets=["Linear"], weights=weights)


def _plain_copy(causal_lm: nn.Module) -> nn.Module:
    """A deep copy of ``causal_lm`` with every PEFT tuner layer replaced by its base layer (LoRA matrices gone),
    so the library sees and quantizes the base weights only, under the names of a plain model."""
    clone = copy.deepcopy(causal_lm)
    wrapped = [name for name, module in clone.named_modules() if is_peft_wrapped(module)]
    for name in wrapped:
        parent_name, _, child = name.rpartition(".")
        parent = clone.get_submodule(parent_name)
        setattr(parent, child, base_layer(getattr(parent, child)))
    return clone.eval()


@contextlib.contextmanager
def _no_pinned_memory() -> Iterator[None]:
    """llmcompressor 0.14's AWQ pins its cached activations with ``Tensor.pin_memory()``, which raises on a machine
    without an accelerator; pinning only speeds host-to-device copies, so on such a machine it is skipped for the
    duration of the block (the library's method is put back afterwards)."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        yield
        return
    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original  # type: ignore[method-assign]


def _run_oneshot(clone: nn.Module, tokenizer: Any, op: str, bits: int, group_size: int | None, ids: Tensor) -> None:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.gptq import GPTQModifier

    modifier = {"gptq": GPTQModifier, "awq": AWQModifier}[op]
    recipe = modifier(config_groups={"group_0": _scheme(op, bits, group_size)}, ignore=["lm_head"])
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    # stderr is held back: llmcompressor draws a progress bar per layer and per AWQ grid search
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stderr(io.StringIO()), _no_pinned_memory():
        # oneshot re-reads the config from `name_or_path` to look for an existing quantization; a model built in
        # memory or converted from GGUF has no such folder, so the copy points at one holding its config.
        clone.config.save_pretrained(folder)
        clone.config.name_or_path = folder
        oneshot(
            model=clone,
            processor=copy.deepcopy(tokenizer),
            dataset=data,
            recipe=recipe,
            num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1],
            shuffle_calibration_samples=False,
        )


@torch.no_grad()
def _quantize_dequantize(linears: list[tuple[str, nn.Linear]]) -> None:
    """Write into each weight what the quantized layer computes with: compressed-tensors' ``forward_quantize``
    (quantize with the layer's scale and zero point, dequantize). GPTQ leaves its weights on the grid already (this
    changes nothing); AWQ leaves them smoothed but unrounded, to be rounded when the model is compressed."""
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    for _name, linear in linears:
        linear.weight.copy_(forward_quantize(linear, linear.weight, "weight", linear.quantization_scheme.weights))


def _cache_key(causal_lm: nn.Module, op: str, bits: int, group_size: int | None, ids: Tensor) -> str:
    versions = {name: metadata.version(name) for name in _LIBRARIES}
    ids_digest = hashlib.sha256(ids.numpy().tobytes()).hexdigest()
    fields = [state_checksum(causal_lm), op, bits, group_size, ids_digest, versions]
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Calibration:
    """What :func:`calibrated_state` produced: the changed tensors, the seconds ``oneshot`` took (0 on a cache
    hit) and whether they came from the cache."""

    state: dict[str, Tensor]
    seconds: float
    cached: bool


def calibrated_state(
    causal_lm: nn.Module,
    tokenizer: Any,
    op: str,
    *,
    bits: int,
    group_size: int | None,
    samples: int,
    seq_len: int,
    seed: int,
    use_cache: bool = True,
) -> Calibration:
    """The tensors of ``causal_lm`` that ``op`` (``"gptq"`` or ``"awq"``) changes, by parameter name of a plain
    model (PEFT ``base_layer`` dropped), as llmcompressor leaves them: quantized weights in float on their grid,
    and for AWQ also the norms and projections its smoothing rescales.

    ``causal_lm`` itself is never changed: ``oneshot`` modifies the model it is given (it quantizes in place and
    attaches scales, observers and hooks), so it runs on a deep copy whose changed tensors are returned.

    Raises:
        RuntimeError: a block ``nn.Linear`` the library did not quantize (it would otherwise be skipped silently).
    """
    ids = calibration_ids(tokenizer, samples, seq_len, seed, op)
    path = cache_dir() / "calibrated" / f"{_cache_key(causal_lm, op, bits, group_size, ids)}.pt"
    if use_cache and path.exists():
        return Calibration(torch.load(path, weights_only=True), 0.0, True)
    start = time.perf_counter()
    clone = _plain_copy(causal_lm)
    original = {name: tensor.detach().clone() for name, tensor in clone.state_dict().items()}
    _run_oneshot(clone, tokenizer, op, bits, group_size, ids)
    linears = block_linears(ModelAdapter(clone), op)
    missed = [name for name, linear in linears if not hasattr(linear, "weight_scale")]
    if missed:
        raise RuntimeError(f"{op}: llmcompressor left {len(missed)} block Linear(s) unquantized, e.g. {missed[0]}.")
    _quantize_dequantize(linears)
    state = clone.state_dict()
    changed = {name: state[name].detach().clone() for name in original if not torch.equal(original[name], state[name])}
    seconds = time.perf_counter() - start
    if use_cache:
        _save(changed, path)
    return Calibration(changed, seconds, False)


def _save(state: dict[str, Tensor], path: Path) -> None:
    """Write ``state`` to ``path`` atomically (a half-written file never looks like a cache hit)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    partial.replace(path)
