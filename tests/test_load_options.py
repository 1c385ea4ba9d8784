"""``load_model(dtype=, device=, device_map=, max_memory=, offload_folder=)`` and the CLI's ``--device``, ``--dtype``
and ``--device-map`` load what was asked: each check reads the loaded parameters themselves (their dtype, their
device, which are held off the module by accelerate), not the options echoed back."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model

import dipreg
from dipreg import audit
from dipreg.cli import main
from dipreg.models import load_model
from dipreg.stimuli import save_pairs

NUM_LAYERS = 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama saved with its tokenizer, as a user's local model folder."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama").save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def half_on_disk() -> dict[str, str]:
    """Embedding, norm, head and blocks 0-3 on the CPU, blocks 4-7 on disk."""
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": "disk" if i >= NUM_LAYERS // 2 else "cpu" for i in range(NUM_LAYERS)})
    return device_map


def dtypes(model: torch.nn.Module) -> set[torch.dtype]:
    return {p.dtype for p in model.parameters()}


def devices(model: torch.nn.Module) -> set[str]:
    return {p.device.type for p in model.parameters()}


def offloaded_blocks(model: torch.nn.Module) -> set[int]:
    """Blocks whose weights are not on the module (accelerate loads them at each forward)."""
    return {int(name.split(".")[2]) for name, p in model.named_parameters() if p.is_meta and ".layers." in name}


@pytest.mark.parametrize(
    ("dtype", "want"),
    [
        ("auto", torch.float32),  # no GPU here: auto is float32
        ("bfloat16", torch.bfloat16),
        ("float16", torch.float16),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_weights_load_in_the_dtype_asked_on_the_device_asked(folder, dtype, want):
    model, tokenizer = load_model(folder, dtype=dtype, device="cpu")
    assert dtypes(model) == {want}
    assert devices(model) == {"cpu"}
    assert not hasattr(model, "hf_device_map")
    assert not model.training and tokenizer.pad_token is not None


def test_a_device_map_places_each_block_where_it_says(folder, tiny_tokenizer, tiny_pairs):
    """Blocks 4-7 of the map are held off the module (``meta``), 0-3 are on the CPU, and the spread model reads the
    margins of the model loaded whole."""
    spread, _ = load_model(folder, device_map=half_on_disk(), dtype="float32")
    assert spread.hf_device_map == half_on_disk()
    assert offloaded_blocks(spread) == set(range(NUM_LAYERS // 2, NUM_LAYERS))
    whole, _ = load_model(folder, device="cpu")
    got = dipreg.trajectories(spread, tiny_tokenizer, tiny_pairs, prompt="raw")
    want = dipreg.trajectories(whole, tiny_tokenizer, tiny_pairs, prompt="raw")
    torch.testing.assert_close(got.did, want.did, atol=1e-5, rtol=1e-5)


def test_max_memory_keeps_the_weights_on_the_cpu_within_the_budget(folder, tmp_path):
    """``device_map="auto"`` with a CPU budget of a third of the weights: what stays on the CPU fits the budget, the
    rest is held off the module."""
    whole, _ = load_model(folder, device="cpu")
    total = sum(p.numel() * p.element_size() for p in whole.parameters())
    budget = total // 3
    spread, _ = load_model(folder, device_map="auto", max_memory={"cpu": budget}, offload_folder=tmp_path / "off")
    on_cpu = sum(p.numel() * p.element_size() for p in spread.parameters() if not p.is_meta)
    assert 0 < on_cpu <= budget
    assert "disk" in spread.hf_device_map.values()


def test_a_device_and_a_device_map_together_are_refused(folder):
    with pytest.raises(ValueError, match="either a device or a device map"):
        load_model(folder, device="cpu", device_map=half_on_disk())


def run_audit(monkeypatch, tmp_path, tiny_pairs, folder, *flags: str) -> tuple[int, list[torch.nn.Module]]:
    """``dipreg audit`` of the tiny model with ``flags``; returns the exit code and the model(s) it loaded."""
    loaded: list[torch.nn.Module] = []

    def spy(*args, **kwargs):
        model, tokenizer = load_model(*args, **kwargs)
        loaded.append(model)
        return model, tokenizer

    monkeypatch.setattr(audit, "load_model", spy)
    save_pairs(tiny_pairs, tmp_path / "pairs.jsonl")
    argv = ["audit", "--model", str(folder), "--pairs", str(tmp_path / "pairs.jsonl"), "--prompt", "raw"]
    return main([*argv, *flags, "--out", str(tmp_path / "audit")]), loaded


def test_cli_dtype_and_device_reach_the_loaded_model(monkeypatch, tmp_path, tiny_pairs, folder):
    code, loaded = run_audit(monkeypatch, tmp_path, tiny_pairs, folder, "--dtype", "bfloat16", "--device", "cpu")
    assert code == 0 and len(loaded) == 1
    assert dtypes(loaded[0]) == {torch.bfloat16} and devices(loaded[0]) == {"cpu"}


def test_cli_device_map_from_a_json_file(monkeypatch, tmp_path, tiny_pairs, folder):
    (tmp_path / "map.json").write_text(json.dumps(half_on_disk()))
    code, loaded = run_audit(monkeypatch, tmp_path, tiny_pairs, folder, "--device-map", str(tmp_path / "map.json"))
    assert code == 0
    assert loaded[0].hf_device_map == half_on_disk()
    assert offloaded_blocks(loaded[0]) == set(range(NUM_LAYERS // 2, NUM_LAYERS))


@pytest.mark.parametrize(
    ("device_map", "message"),
    [
        ({"model.layers.0": "tpu"}, "'tpu'"),
        ({"model.layers.0": "cuda:0"}, "no CUDA GPU is available"),
        ({}, "non-empty"),
    ],
    ids=["unknown-device", "gpu-without-gpu", "empty"],
)
def test_cli_bad_device_map_exits_2_with_one_line(
    monkeypatch, tmp_path, tiny_pairs, folder, capsys, device_map, message
):
    (tmp_path / "map.json").write_text(json.dumps(device_map))
    code, loaded = run_audit(monkeypatch, tmp_path, tiny_pairs, folder, "--device-map", str(tmp_path / "map.json"))
    err = capsys.readouterr().err
    assert code == 2 and loaded == []
    assert err.count("\n") == 1 and err.startswith("error: --device/--dtype/--device-map:") and message in err
    assert not (tmp_path / "audit").exists()


def test_a_device_map_naming_a_module_the_model_lacks_is_refused(monkeypatch, tmp_path, tiny_pairs, folder, capsys):
    """transformers would ignore the unknown name and load the whole model on the CPU: a typo must not pass."""
    with pytest.raises(dipreg.ModelLoadError, match=r"does not have: model\.layer\.0\. Use names"):
        load_model(folder, device_map={"model.layer.0": "cpu"})
    (tmp_path / "map.json").write_text(json.dumps({**half_on_disk(), "model.nrom": "cpu"}))
    code, loaded = run_audit(monkeypatch, tmp_path, tiny_pairs, folder, "--device-map", str(tmp_path / "map.json"))
    err = capsys.readouterr().err  # after transformers' own loading bar: the model loads before the check
    assert code == 2 and loaded == [] and err.count("error:") == 1
    assert err.splitlines()[-1].startswith("error: device_map names module(s)") and "model.nrom" in err
