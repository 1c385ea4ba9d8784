"""NF4 and int8 run through bitsandbytes: bit-exact against written-out references (NF4 levels from the normal
quantiles, nearest level per absmax-scaled block; int8 absmax per row), in the degrade operators too; without
bitsandbytes the operators fail at once with one line naming the extra."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model, requires_extra
from scipy.stats import norm

from dipreg.cli import main
from dipreg.eval import DegradeError, degrade, parse_ops, state_checksum
from dipreg.eval.degradation import quantize

#: The tests that run bitsandbytes; the one of its absence simulates it and runs whether it is installed or not.
needs_bitsandbytes = requires_extra("bitsandbytes", "quant")

NF4_OFFSET = 0.9677083  # QLoRA's offset: the outermost quantiles are those of 1 - offset and offset


def reference_nf4_levels() -> torch.Tensor:
    """The 16 NF4 levels written out (QLoRA): 8 positive and 7 negative normal quantiles of float32-spaced
    probabilities and an exact zero, stored as float32 and normalised to [-1, 1] in float32 (the precision the
    QLoRA construction uses; float64 throughout gives levels a few ulps away)."""
    positive = norm.ppf(torch.linspace(NF4_OFFSET, 0.5, 9)[:-1].numpy()).tolist()
    negative = (-norm.ppf(torch.linspace(NF4_OFFSET, 0.5, 8)[:-1].numpy())).tolist()
    values = torch.tensor(sorted([*positive, 0.0, *negative]), dtype=torch.float32)
    return values / values.max()


def reference_nf4(weight: torch.Tensor, block_size: int = 64) -> torch.Tensor:
    """Blockwise NF4 written out: flatten, blocks of ``block_size`` (the last one shorter), each value divided by
    its block's absmax and replaced by the nearest level (smallest |x - level|), times the absmax (float32)."""
    flat = weight.float().reshape(-1)
    levels = reference_nf4_levels()
    out = torch.empty_like(flat)
    for start in range(0, flat.numel(), block_size):
        block = flat[start : start + block_size]
        absmax = block.abs().max()
        scaled = block / absmax if absmax > 0 else torch.zeros_like(block)
        nearest = (scaled[:, None] - levels[None, :]).abs().argmin(dim=1)
        out[start : start + block_size] = levels[nearest] * absmax
    return out.reshape(weight.shape).to(weight.dtype)


def reference_int8_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM.int8 vector-wise weight quantization written out: per row, absmax and round(w · 127 / absmax)."""
    w = weight.float()
    absmax = w.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    return torch.round(w * 127 / safe[:, None]), absmax


def weights() -> list[torch.Tensor]:
    torch.manual_seed(0)
    ragged = torch.randn(3, 7)  # 21 values: one short block
    zero_block = torch.randn(4, 64)
    zero_block[1] = 0.0  # a whole block (and a whole row) of zeros
    outlier = torch.randn(16, 96)
    outlier[3, 5] = 40.0  # one large value dominates its block and its row
    return [torch.randn(64, 576), ragged, zero_block, outlier]


@needs_bitsandbytes
def test_nf4_levels_of_bitsandbytes_are_the_written_out_ones_bit_for_bit():
    assert torch.equal(quantize.nf4_code(), reference_nf4_levels())


@needs_bitsandbytes
@pytest.mark.parametrize("block_size", [64, 32, 128])
def test_nf4_equals_the_written_out_reference_bit_for_bit(block_size):
    for w in weights():
        assert torch.equal(quantize.nf4(w, block_size), reference_nf4(w, block_size)), (tuple(w.shape), block_size)


@needs_bitsandbytes
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_are_scaled_in_float32_and_rounded_back(dtype):
    w = weights()[0].to(dtype)
    got = quantize.nf4(w)
    assert got.dtype == dtype and torch.equal(got, reference_nf4(w.float()).to(dtype))


@needs_bitsandbytes
def test_int8_rounds_each_row_on_its_absmax_grid():
    for w in weights():
        got = quantize.int8(w)
        codes, absmax = reference_int8_codes(w)
        expected = codes * absmax[:, None] / 127
        # the integer code of every value is the reference's, exactly ...
        safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
        assert torch.equal(torch.round(got * 127 / safe[:, None]), codes)
        # ... and the value agrees to float32 rounding (bitsandbytes multiplies by 1/127 instead of dividing)
        torch.testing.assert_close(got, expected, rtol=2.5e-7, atol=0)
        assert torch.equal(got[absmax == 0], torch.zeros_like(got[absmax == 0]))


@needs_bitsandbytes
def test_degrade_operators_write_the_reference_weights_and_restore_them():
    model = make_tiny_model("llama")
    before = state_checksum(model)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    for op, reference in (("nf4", reference_nf4), ("int8", None)):
        with degrade(model, op) as report:
            assert report.details["matrices"] == 8 * 7  # q, k, v, o, gate, up, down in 8 blocks
            for name, param in model.named_parameters():
                in_block = ".layers." in name and name.endswith("proj.weight")
                if not in_block:
                    assert torch.equal(param, original[name]), name
                elif reference is not None:
                    assert torch.equal(param, reference(original[name])), name
                else:
                    codes, absmax = reference_int8_codes(original[name])
                    torch.testing.assert_close(param, codes * absmax[:, None] / 127, rtol=2.5e-7, atol=0)
        assert state_checksum(model) == before


@needs_bitsandbytes
def test_nf4_block_size_outside_bitsandbytes_is_refused_before_anything_runs():
    with pytest.raises(DegradeError, match=r"nf4: block_size=48 is not one bitsandbytes supports; use one of 32, 64"):
        parse_ops("nf4:block_size=48")


def test_without_bitsandbytes_the_operators_name_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(quantize, "_bitsandbytes", lambda: None)
    for op in ("nf4", "int8"):
        with pytest.raises(DegradeError, match=rf"^{op} runs through bitsandbytes, which is not installed: pip"):
            parse_ops(op)
    assert parse_ops("rtn:bits=4") == [("rtn", {"bits": 4})]  # the other operators do not need it
    out = tmp_path / "degrade"
    assert main(["degrade", "--ops", "rtn:bits=4,nf4", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'dipreg[quant]'" in err
    assert not out.exists()  # refused before the output folder and the model


def test_the_skip_without_the_extra_gives_the_install_line_the_operators_print():
    assert needs_bitsandbytes.kwargs["reason"] == f"needs the quant extra: {quantize.QUANT_EXTRA}"
