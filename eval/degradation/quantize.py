"""Simulated weight quantization (quantize then dequantize) as pure tensor functions; no model access.

- Round-to-nearest (RTN) symmetric absmax per output channel or per group, written out here: no library we use
  offers 3-bit RTN with this rounding convention (absmax/(2^(b-1)-1), no clipping).
- NF4 and int8 run through bitsandbytes' own functions (``quantize_4bit``/``dequantize_4bit`` with
  ``quant_type="nf4"``, ``int8_vectorwise_quant``/``int8_vectorwise_dequant``), the code that ``Linear4bit`` and
  LLM.int8 use, on the CPU and on GPUs alike. bitsandbytes is the optional extra ``dipreg[quant]``; without it these
  two fail with one line that names the extra (:func:`bitsandbytes_problem`, checked before any model loads).
"""

from __future__ import annotations

import logging
from functools import cache
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

RTN_BITS: tuple[int, ...] = (8, 4, 3)
#: Block sizes bitsandbytes' 4-bit quantization accepts.
NF4_BLOCK_SIZES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: Operators computed by bitsandbytes.
BITSANDBYTES_OPS: tuple[str, ...] = ("nf4", "int8")
#: What to install when bitsandbytes is missing.
QUANT_EXTRA = "pip install 'dipreg[quant]'"


def rtn(weight: Tensor, bits: int, group_size: int | None = None) -> Tensor:
    """Symmetric round-to-nearest of a ``(out, in)`` matrix, dequantized back to its dtype.

    Each output channel (row), or each group of ``group_size`` consecutive inputs in a row, gets the scale
    ``absmax / (2**(bits-1) - 1)`` (when ``group_size`` does not divide the row, its last group is shorter);
    values are rounded to the integer grid ``[-qmax, qmax]`` and scaled back.
    All-zero rows/groups stay zero.

    Example:
        >>> rtn(torch.tensor([[1.0, -0.5, 0.26]]), bits=3).tolist()  # qmax 3, scale 1/3
        [[1.0, -0.6666666865348816, 0.3333333432570343]]
    """
    if bits not in RTN_BITS:
        raise ValueError(f"bits={bits} is not supported; choose one of {RTN_BITS}.")
    if group_size is not None and group_size < 1:
        raise ValueError(f"group_size={group_size} must be a positive integer (or None for per-channel).")
    rows, cols = weight.shape
    group = group_size or cols
    pad = (-cols) % group  # zero padding never changes an absmax: a ragged last group is just shorter
    qmax = 2 ** (bits - 1) - 1
    w = torch.nn.functional.pad(weight.detach().float(), (0, pad)).reshape(rows, -1, group)
    scale = w.abs().amax(-1, keepdim=True) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(w / scale), -qmax, qmax)
    return (q * scale).reshape(rows, cols + pad)[:, :cols].to(weight.dtype)


@cache
def _bitsandbytes() -> ModuleType | None:
    """``bitsandbytes.functional``, or ``None`` when bitsandbytes is not installed (imported once)."""
    # Importing it on a CPU without the optional `kernels` package logs a warning about a 4-bit GEMM we never call.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as functional
    except ImportError:
        return None
    return functional


def bitsandbytes_problem(op: str, params: dict[str, Any]) -> str | None:
    """Why operator ``op`` cannot run with ``params`` here (bitsandbytes missing, an NF4 block size bitsandbytes
    refuses), in one line, or ``None``. Operators outside :data:`BITSANDBYTES_OPS` always get ``None``."""
    if op not in BITSANDBYTES_OPS:
        return None
    if _bitsandbytes() is None:
        return f"{op} runs through bitsandbytes, which is not installed: {QUANT_EXTRA} (bitsandbytes>=0.45)."
    block_size = params.get("block_size")
    if op == "nf4" and block_size is not None and block_size not in NF4_BLOCK_SIZES:
        sizes = ", ".join(map(str, NF4_BLOCK_SIZES))
        return f"nf4: block_size={block_size} is not one bitsandbytes supports; use one of {sizes}."
    return None


def _functional(op: str) -> ModuleType:
    functional = _bitsandbytes()
    if functional is None:
        raise ValueError(bitsandbytes_problem(op, {}))
    return functional


def _float_input(weight: Tensor) -> Tensor:
    # bitsandbytes quantizes float32, float16 and bfloat16; anything else goes in as float32.
    w = weight.detach()
    return w if w.dtype in (torch.float32, torch.float16, torch.bfloat16) else w.float()


def nf4_code() -> Tensor:
    """The 16 NF4 levels bitsandbytes uses (``functional.get_4bit_type("nf4")``), ascending, float32."""
    return _functional("nf4").get_4bit_type("nf4", device="cpu").float()


def nf4(weight: Tensor, block_size: int = 64) -> Tensor:
    """Blockwise NF4 of any tensor through bitsandbytes, dequantized back to its dtype.

    ``quantize_4bit(w, blocksize=block_size, quant_type="nf4")`` then ``dequantize_4bit``: the tensor is
    flattened in row-major order and cut into blocks of ``block_size`` values (the last one may be shorter);
    each block is scaled by the reciprocal of its absmax (kept in float32) and every value snapped to the nearest
    NF4 level. float16/bfloat16 weights are scaled in float32 and the result is rounded back to their dtype.
    """
    functional = _functional("nf4")
    problem = bitsandbytes_problem("nf4", {"block_size": block_size})
    if problem:
        raise ValueError(problem)
    # Quantized as one flat row: NF4 blocks run over the flattened tensor, but bitsandbytes 0.50.2's CPU
    # dequantize kernel counts blocks row by row, so a 2-D (576, 576) weight with block_size 128 (576 = 4.5
    # blocks per row) would come back scaled by the wrong absmax. A flat row is the same blocks on every device.
    flat = _float_input(weight).reshape(-1)
    packed, state = functional.quantize_4bit(flat, blocksize=block_size, quant_type="nf4")
    return functional.dequantize_4bit(packed, state).reshape(weight.shape).to(weight.dtype)


def int8(weight: Tensor) -> Tensor:
    """LLM.int8's vector-wise weight quantization through bitsandbytes, dequantized back to the weight's dtype.

    ``int8_vectorwise_quant`` (threshold 0: no outlier columns held back) rounds ``w·127/absmax`` per row
    (absmax in float32) to int8; ``int8_vectorwise_dequant`` multiplies back by ``absmax/127``. All-zero rows stay
    zero. On the CPU float32/float16/bfloat16 weights go in as they are; bitsandbytes' GPU kernel takes float16
    only, so on a GPU the weights are first rounded to float16, as ``Linear8bitLt`` stores them.
    """
    functional = _functional("int8")
    rows = _float_input(weight).reshape(-1, weight.shape[-1])
    if rows.device.type != "cpu":
        rows = rows.half()
    quantized, row_absmax, _ = functional.int8_vectorwise_quant(rows)
    return functional.int8_vectorwise_dequant(quantized, row_absmax).reshape(weight.shape).to(weight.dtype)


#: What to install when hqq is missing (its setup.py builds CUDA kernels unless DISABLE_CUDA=1).
HQQ_EXTRA = "DISABLE_CUDA=1 pip install 'dipreg[hqq]'"


@cache
def _hqq() -> ModuleType | None:
    """``hqq.core.quantize``, or ``None`` when hqq is not installed (imported once)."""
    try:
        import hqq.core.quantize as hqq_quantize
    except ImportError:
        return None
    return hqq_quantize


def hqq_problem(op: str, params: dict[str, Any]) -> str | None:
    """Why ``op`` cannot run with ``params`` here (hqq missing, a group size hqq refuses), in one line, or ``None``;
    ``None`` for every operator but hqq."""
    if op != "hqq":
        return None
    if _hqq() is None:
        return f"hqq runs through the hqq library, which is not installed: {HQQ_EXTRA} (hqq>=0.2.8)."
    group_size = params.get("group_size")
    if isinstance(group_size, int) and group_size % 8:
        return f"hqq: group_size={group_size} is not a multiple of 8, which hqq requires; use e.g. 16, 32 or 64."
    return None


def hqq(weight: Tensor, bits: int, group_size: int | None) -> Tensor:
    """Half-Quadratic Quantization of a ``(out, in)`` matrix through hqq, dequantized back to its dtype; the
    weights ``HQQLinear(linear, BaseQuantizeConfig(bits, group_size, axis=1), compute_dtype=float32)`` computes with.

    hqq's own settings for that config (asymmetric, one scale and zero per group of ``group_size`` consecutive
    inputs of a row, or per row when ``None``; zero rounded at 4 bits; refined by hqq's proximal solver, no
    calibration data), then ``Quantizer.quantize`` (unpacked codes) and ``Quantizer.dequantize`` in float32, on the
    weight's device. hqq groups the flattened tensor, so a group size that does not divide the row would mix rows:
    refused here.
    """
    module = _hqq()
    if module is None:
        raise ValueError(hqq_problem("hqq", {}))
    if group_size is not None and weight.shape[-1] % group_size:
        raise ValueError(f"hqq: group_size={group_size} does not divide the {weight.shape[-1]} inputs of a row.")
    settings = dict(module.BaseQuantizeConfig(nbits=bits, group_size=group_size, axis=1)["weight_quant_params"])
    settings["group_size"] = group_size or weight.shape[-1]  # per row, as HQQLinear resolves None
    codes, meta = module.Quantizer.quantize(
        weight.detach().float(), **settings, bitpack=False, device=str(weight.device)
    )
    meta["compute_dtype"] = torch.float32
    return module.Quantizer.dequantize(codes, meta).to(weight.dtype)
