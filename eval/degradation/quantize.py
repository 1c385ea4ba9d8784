"""Simulated weight quantization (quantize then dequantize) as pure tensor functions; no model access.

Round-to-nearest (RTN) symmetric absmax quantization per output channel or per group, and blockwise NF4.
bitsandbytes is not installed here (and its 4-bit kernels need CUDA), so NF4 is written out: the code table is
built the way bitsandbytes builds it (``create_normal_map`` with offset 0.9677083, QLoRA) and a test checks it
against the constants bitsandbytes publishes in ``functional.get_4bit_type``.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor

RTN_BITS: tuple[int, ...] = (8, 4, 3)
NF4_OFFSET = 0.9677083


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
def _nf4_code_list() -> tuple[float, ...]:
    from scipy.stats import norm  # imported here: only NF4 needs it, and the CLI imports this module early

    # bitsandbytes' create_normal_map(offset, use_extra_value=True) restricted to the 16 NF4 values: 8 positive
    # and 7 negative normal quantiles plus an exact zero, normalised to [-1, 1].
    positive = norm.ppf(torch.linspace(NF4_OFFSET, 0.5, 9)[:-1].numpy()).tolist()
    negative = (-norm.ppf(torch.linspace(NF4_OFFSET, 0.5, 8)[:-1].numpy())).tolist()
    values = torch.tensor(sorted([*positive, 0.0, *negative]))
    return tuple((values / values.max()).tolist())


def nf4_code() -> Tensor:
    """The 16 NF4 levels in ascending order (float32), from -1 to 1 with an exact 0."""
    return torch.tensor(_nf4_code_list(), dtype=torch.float32)


def nf4(weight: Tensor, block_size: int = 64) -> Tensor:
    """Blockwise NF4 of any tensor, dequantized back to its dtype (bitsandbytes' ``quantize_4bit`` semantics).

    The tensor is flattened in row-major order and cut into blocks of ``block_size`` values (the last one padded
    with zeros); each block is divided by its absmax and every value snapped to the nearest NF4 level.
    """
    if block_size < 1:
        raise ValueError(f"block_size={block_size} must be a positive integer (bitsandbytes uses 64).")
    flat = weight.detach().float().reshape(-1)
    pad = (-flat.numel()) % block_size
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, block_size)
    absmax = blocks.abs().amax(-1, keepdim=True)
    absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    code = nf4_code()
    index = torch.bucketize(blocks / absmax, (code[1:] + code[:-1]) / 2)
    out = (code[index] * absmax).reshape(-1)[: flat.numel()]
    return out.reshape(weight.shape).to(weight.dtype)
