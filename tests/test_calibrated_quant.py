"""The hqq, gptq and awq degradation operators: each writes the weights its library computes (held to the library's
own output, computed here independently), restores the model bit-exactly (also after an exception and nested in
another degradation), refuses a group size that does not divide a layer's inputs, and calibrates deterministically
for a seed, through a cache keyed by the model's checksum and the options. Without the libraries the operators
name the extra to install."""

import copy
import tempfile

import pytest
import torch
from conftest import make_tiny_model, requires_extra
from peft import LoraConfig, get_peft_model

from dipreg.cli import main
from dipreg.eval import DegradeError, UnsupportedOperatorError, degrade, parse_ops, state_checksum
from dipreg.eval.degradation import calibrated, quantize
from dipreg.eval.degradation.calibrated import calibration_ids

NEEDS_CALIB = requires_extra("llmcompressor", "calib")
NEEDS_HQQ = requires_extra("hqq", "hqq")
# Options that fit the tiny model (width 32, intermediate 64) and keep calibration to a few seconds.
TINY = {"group_size": 16, "samples": 4, "seq_len": 16}


def block_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every block Linear weight of a plain tiny model, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".layers." in n and n.endswith("proj.weight")}


def library_oneshot(model: torch.nn.Module, tokenizer, op: str, bits: int, ids: torch.Tensor) -> torch.nn.Module:
    """llmcompressor's own result on a copy of ``model``, written out here as its README shows (a recipe with a
    config group, ``oneshot`` on a tokenized dataset), without dipreg's operator code."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.pipelines.cache import IntermediatesCache

    clone = copy.deepcopy(model)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=op == "gptq", strategy="group", group_size=16)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    recipe = (GPTQModifier if op == "gptq" else AWQModifier)(config_groups={"g": scheme}, ignore=["lm_head"])
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    original_pin = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *a, **k: None  # no accelerator here to pin for
    try:
        with tempfile.TemporaryDirectory() as folder:
            clone.config.save_pretrained(folder)
            clone.config.name_or_path = folder
            oneshot(
                model=clone,
                processor=tokenizer,
                dataset=data,
                recipe=recipe,
                num_calibration_samples=ids.shape[0],
                max_seq_length=ids.shape[1],
                shuffle_calibration_samples=False,
            )
    finally:
        IntermediatesCache.pin_memory = original_pin
    return clone


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh calibration cache for the test."""
    monkeypatch.setenv("DIPREG_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "calibrated"


def enter(model: torch.nn.Module, op: str, **params) -> None:
    """Enter and leave ``degrade(model, op, **params)``: what a refused operator never gets past."""
    with degrade(model, op, **params):
        pass


# -- hqq -----------------------------------------------------------------------------------------------------------


@NEEDS_HQQ
@pytest.mark.parametrize("bits", [4, 3])
def test_hqq_writes_what_hqqs_own_linear_layer_dequantizes(bits):
    import hqq.core.quantize as hqq_core

    model = make_tiny_model("llama")
    original = block_weights(model)
    others = {n: p.detach().clone() for n, p in model.named_parameters() if n not in original}
    config = hqq_core.BaseQuantizeConfig(nbits=bits, group_size=16, axis=1)
    with degrade(model, "hqq", bits=bits, group_size=16) as report:
        assert report.details["matrices"] == 8 * 7
        for name, weight in block_weights(model).items():
            linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            linear.weight.data = original[name].clone()
            reference = hqq_core.HQQLinear(linear, config, compute_dtype=torch.float32, device="cpu").dequantize()
            assert torch.equal(weight, reference), name
            assert not torch.equal(weight, original[name]), name
        for name, param in model.named_parameters():
            if name in others:
                assert torch.equal(param, others[name]), name  # embeddings, norms, head untouched


# -- gptq / awq against llmcompressor's own output ------------------------------------------------------------------


@NEEDS_CALIB
@pytest.mark.parametrize(("op", "bits"), [("gptq", 4), ("gptq", 3), ("awq", 4)])
def test_calibrated_operators_write_llmcompressors_own_weights(op, bits, tiny_tokenizer, cache):
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    model = make_tiny_model("llama")
    before = state_checksum(model)
    ids = calibration_ids(tiny_tokenizer, TINY["samples"], TINY["seq_len"], seed=0)
    reference = library_oneshot(model, tiny_tokenizer, op, bits, ids)
    expected = reference.state_dict()
    for name, module in reference.named_modules():
        if ".layers." in name and name.endswith("proj"):
            scale, zero = module.weight_scale, module.weight_zero_point
            # the library's grid: integer codes of `bits` bits times the group's scale
            codes = module.weight.detach().unflatten(-1, (-1, 16)) / scale.unsqueeze(-1) + zero.unsqueeze(-1)
            if op == "gptq":  # GPTQ leaves its weights on that grid
                assert torch.allclose(codes, codes.round(), atol=1e-3), name
            else:  # AWQ leaves them smoothed; compressed-tensors rounds them when it compresses the model
                dequantized = fake_quantize(module.weight, scale, zero, module.quantization_scheme.weights)
                assert not torch.equal(dequantized, module.weight), name
                expected[f"{name}.weight"] = dequantized
            assert codes.round().min() >= -(2 ** (bits - 1)) and codes.round().max() <= 2 ** (bits - 1) - 1
    with degrade(model, op, tokenizer=tiny_tokenizer, bits=bits, **TINY) as report:
        changed = [n for n, p in model.state_dict().items() if not torch.equal(p, expected[n])]
        assert changed == []
        assert report.details["cached"] is False and report.details["calibration_tokens"] == 64
    assert state_checksum(model) == before


@NEEDS_CALIB
def test_awq_also_rescales_the_norms_in_front_of_the_projections(tiny_tokenizer, cache):
    model = make_tiny_model("llama")
    norm = model.model.layers[0].input_layernorm.weight.detach().clone()
    with degrade(model, "awq", tokenizer=tiny_tokenizer, **TINY) as report:
        assert not torch.equal(model.model.layers[0].input_layernorm.weight, norm)
        assert report.details["tensors"] > 8 * 7  # every projection plus norms it smoothed
    assert torch.equal(model.model.layers[0].input_layernorm.weight, norm)


# -- restore ---------------------------------------------------------------------------------------------------------

NEW_OPS = [
    pytest.param("hqq", marks=NEEDS_HQQ, id="hqq"),
    pytest.param("gptq", marks=NEEDS_CALIB, id="gptq"),
    pytest.param("awq", marks=NEEDS_CALIB, id="awq"),
]


def options(op: str) -> dict:
    return {"group_size": 16} if op == "hqq" else dict(TINY)


@pytest.mark.parametrize("op", NEW_OPS)
def test_restores_bit_exactly_after_an_exception_and_when_nested(op, tiny_tokenizer, cache):
    model = make_tiny_model("llama")
    before = state_checksum(model)
    with pytest.raises(KeyError, match="body failed"), degrade(model, op, tokenizer=tiny_tokenizer, **options(op)):
        assert state_checksum(model) != before
        raise KeyError("body failed")
    assert state_checksum(model) == before
    with degrade(model, "late_svd", rank=4):
        svd = state_checksum(model)
        with degrade(model, op, tokenizer=tiny_tokenizer, verify=True, **options(op)):
            assert state_checksum(model) not in (before, svd)
        assert state_checksum(model) == svd
        with degrade(model, "rtn", bits=3) as outer_rtn:  # and the new operator outside another one
            assert outer_rtn.details["matrices"] == 56
    assert state_checksum(model) == before
    with degrade(model, op, tokenizer=tiny_tokenizer, **options(op)), degrade(model, "late_drop"):
        pass
    assert state_checksum(model) == before


@pytest.mark.parametrize("op", NEW_OPS)
def test_a_group_size_that_does_not_divide_a_layer_is_refused_naming_it(op, tiny_tokenizer, cache):
    model = make_tiny_model("llama")
    before = state_checksum(model)
    # 24 divides neither the width (32) of the attention projections nor the MLP's 64 intermediate inputs
    with pytest.raises(DegradeError, match=rf"^{op}: group_size=24 does not divide the 32 inputs of layers\.0\.self"):
        enter(model, op, tokenizer=tiny_tokenizer, **{**options(op), "group_size": 24})
    assert state_checksum(model) == before
    # a block whose MLP is 48 wide: group_size=32 fits every other input width (32, 64), not its down_proj
    model.model.layers[0].mlp.down_proj = torch.nn.Linear(48, 32, bias=False)
    model.model.layers[0].mlp.up_proj = torch.nn.Linear(32, 48, bias=False)
    model.model.layers[0].mlp.gate_proj = torch.nn.Linear(32, 48, bias=False)
    with pytest.raises(DegradeError, match=r"group_size=32 does not divide the 48 inputs of layers\.0\.mlp\.down_proj"):
        enter(model, op, tokenizer=tiny_tokenizer, **{**options(op), "group_size": 32})
    assert not cache.exists()  # refused before any calibration


# -- determinism and the cache ---------------------------------------------------------------------------------------


def test_calibration_windows_are_fixed_by_the_seed(tiny_tokenizer):
    first = calibration_ids(tiny_tokenizer, 4, 16, seed=0)
    assert first.shape == (4, 16)
    assert torch.equal(first, calibration_ids(tiny_tokenizer, 4, 16, seed=0))
    assert not torch.equal(first, calibration_ids(tiny_tokenizer, 4, 16, seed=1))
    with pytest.raises(ValueError, match=r"samples=1000 × seq_len=512 needs 512000 calibration tokens"):
        calibration_ids(tiny_tokenizer, 1000, 512, seed=0)


@NEEDS_CALIB
@pytest.mark.parametrize("op", ["gptq", "awq"])
def test_calibration_is_deterministic_for_a_seed_and_cached(op, tiny_tokenizer, tmp_path, monkeypatch):
    model = make_tiny_model("llama")

    def run(cache_name: str, seed: int) -> tuple[dict, dict]:
        monkeypatch.setenv("DIPREG_CACHE", str(tmp_path / cache_name))
        with degrade(model, op, tokenizer=tiny_tokenizer, seed=seed, **TINY) as report:
            return {n: p.detach().clone() for n, p in model.named_parameters()}, report.details

    first, details = run("a", 0)
    again, _ = run("b", 0)  # a second, empty cache: calibrated afresh
    assert details["cached"] is False and all(torch.equal(first[n], again[n]) for n in first)
    other, _ = run("b", 1)
    assert any(not torch.equal(first[n], other[n]) for n in first)  # the seed picks other windows
    hit, details = run("a", 0)
    assert details["cached"] is True and details["calibration_s"] == 0.0
    assert all(torch.equal(first[n], hit[n]) for n in first)
    assert len(list((tmp_path / "a" / "calibrated").glob("*.pt"))) == 1
    with torch.no_grad():  # another model (a changed weight) is another cache entry
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0
    _, details = run("a", 0)
    assert details["cached"] is False and len(list((tmp_path / "a" / "calibrated").glob("*.pt"))) == 2


# -- PEFT, tokenizer, missing libraries ------------------------------------------------------------------------------


def lora_model():
    model = get_peft_model(make_tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)  # a trained adapter: LoRA changes the output
    return model


@NEEDS_CALIB
def test_gptq_on_a_peft_model_quantizes_the_base_weights_as_on_the_plain_model(tiny_tokenizer, cache):
    peft_model, plain = lora_model(), make_tiny_model("llama")
    lora = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}
    before = state_checksum(peft_model)
    with degrade(plain, "gptq", tokenizer=tiny_tokenizer, **TINY):
        expected = block_weights(plain)
    with degrade(peft_model, "gptq", tokenizer=tiny_tokenizer, **TINY) as report:
        base = peft_model.get_base_model()
        got = {n.replace(".base_layer", ""): p for n, p in base.named_parameters()}
        assert report.details["tensors"] == 56
        assert all(torch.equal(got[n], expected[n]) for n in expected)
        assert all(torch.equal(p, lora[n]) for n, p in peft_model.named_parameters() if "lora_" in n)
    assert state_checksum(peft_model) == before


@NEEDS_CALIB
def test_awq_refuses_a_peft_model_and_calibrated_operators_need_a_tokenizer(tiny_tokenizer, cache):
    model = lora_model()
    with pytest.raises(UnsupportedOperatorError, match=r"awq rescales the norms .* merge the adapter first"):
        enter(model, "awq", tokenizer=tiny_tokenizer, **TINY)
    with pytest.raises(DegradeError, match=r"gptq calibrates on text: pass the model's tokenizer"):
        enter(model, "gptq", **TINY)
    assert not cache.exists()


def test_without_the_libraries_the_operators_name_the_extras(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(calibrated, "_llmcompressor", lambda: None)
    monkeypatch.setattr(quantize, "_hqq", lambda: None)
    for op in ("gptq", "awq"):
        message = rf"^{op} runs through llmcompressor, which is not installed: pip install 'dipreg\[calib\]' && pip"
        with pytest.raises(DegradeError, match=message):
            parse_ops(f"{op}:bits=3")
    with pytest.raises(DegradeError, match=r"^hqq runs through the hqq library, which is not installed: DISABLE_CUDA"):
        parse_ops("hqq")
    with pytest.raises(ValueError, match=r"hqq library, which is not installed"):
        quantize.hqq(torch.ones(2, 4), 4, 2)
    assert parse_ops("rtn:bits=4") == [("rtn", {"bits": 4})]  # the other operators do not need them
    out = tmp_path / "degrade"
    assert main(["degrade", "--ops", "rtn:bits=4,gptq", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install --no-deps llmcompressor==0.14.0.1" in err
    assert not out.exists()  # refused before the output folder and the model


def test_bad_calibration_options_are_refused_by_name(monkeypatch):
    installed = object()  # the check under test comes after the library check: let that one pass
    monkeypatch.setattr(calibrated, "_llmcompressor", lambda: installed)
    monkeypatch.setattr(quantize, "_hqq", lambda: installed)
    for spec, message in [
        ("gptq:samples=0", "gptq: samples=0 must be a positive integer"),
        ("awq:seq_len=2.5", "awq: seq_len=2.5 must be a positive integer"),
        ("gptq:seed=-1", "gptq: seed=-1 must be a non-negative integer"),
        ("hqq:bits=2", "hqq: bits=2 is not supported"),
        ("hqq:group_size=12", "hqq: group_size=12 is not a multiple of 8, which hqq requires"),
        ("gptq:calibration=7", "Operator 'gptq' has no parameter"),
    ]:
        with pytest.raises(DegradeError, match=message):
            parse_ops(spec)
