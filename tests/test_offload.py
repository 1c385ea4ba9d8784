"""A model that accelerate spreads over the CPU and offload (disk, or CPU memory with the module on ``meta``) reads the
same trajectories, causal margins and degradations as the same model in one piece, and is restored bit-exactly.

No GPU needed: ``max_memory`` (or a hand-made device map) forces blocks off the main device, so their weights live
in accelerate's weights map and are loaded by its hooks at each forward, the path a device map over GPUs takes too.
"""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import cpu_offload, dispatch_model, infer_auto_device_map
from conftest import make_tiny_model, operator_param

import dipreg
from dipreg.adapter import ModelAdapter
from dipreg.eval import UnsupportedOperatorError, degrade, state_checksum
from dipreg.eval.degradation.operators import OPERATORS

#: Operator parameters that fit the tiny model (width 32).
PARAMS = {"late_svd": {"rank": 4}, "mid_svd": {"rank": 4}, "hqq": {"group_size": 16}}
#: Operators that calibrate through llmcompressor.
CALIBRATED_OPS = ("gptq", "awq")
#: Offloaded weights are the same bytes, and the CPU runs the same kernels: the margins agree to rounding.
TOL = {"atol": 1e-5, "rtol": 1e-5}


def _bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _by_max_memory(model: torch.nn.Module, folder) -> torch.nn.Module:
    """The issue's set-up: ``max_memory`` lets only about a third of the weights stay on the CPU; accelerate puts
    the other blocks on disk."""
    device_map = infer_auto_device_map(
        model, max_memory={"cpu": _bytes(model) // 3}, no_split_module_classes=model._no_split_modules
    )
    assert "disk" in device_map.values() and "cpu" in device_map.values(), device_map
    return dispatch_model(model, device_map=device_map, offload_dir=str(folder))


def _embedding_on_disk(model: torch.nn.Module, folder) -> torch.nn.Module:
    """Embedding, every other block and the LM head on disk: ``model.device`` is then ``meta``, so any code that
    sends inputs to ``model.device`` fails."""
    device_map = {"model.embed_tokens": "disk", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "disk"}
    device_map.update({f"model.layers.{i}": "disk" if i % 2 else "cpu" for i in range(model.config.num_hidden_layers)})
    return dispatch_model(model, device_map=device_map, offload_dir=str(folder))


def _cpu_memory_offload(model: torch.nn.Module, _folder) -> torch.nn.Module:
    """accelerate's ``cpu_offload``: every weight in a CPU dict, every module's parameters on ``meta``."""
    return cpu_offload(model, execution_device=torch.device("cpu"))


PLACEMENTS = {"max_memory": _by_max_memory, "embedding_on_disk": _embedding_on_disk, "cpu_offload": _cpu_memory_offload}


@pytest.fixture(params=list(PLACEMENTS))
def plain_and_dispatched(request, tmp_path):
    plain = make_tiny_model("llama")
    dispatched = PLACEMENTS[request.param](copy.deepcopy(plain), tmp_path / "offload")
    return plain, dispatched


def test_placements_really_offload(plain_and_dispatched):
    """Guard of the other tests: some weights are on ``meta`` (held by accelerate's hooks), not on the module."""
    _, dispatched = plain_and_dispatched
    meta = [name for name, p in dispatched.named_parameters() if p.is_meta]
    assert meta and len(meta) < len(list(dispatched.named_parameters())) + 1
    assert ModelAdapter(dispatched).input_device == torch.device("cpu")  # never meta


def test_trajectories_and_causal_margins_match_the_plain_model(plain_and_dispatched, tiny_tokenizer, tiny_pairs):
    plain, dispatched = plain_and_dispatched
    want = dipreg.trajectories_by_lens(plain, tiny_tokenizer, tiny_pairs, ["logit", "causal"], prompt="raw")
    got = dipreg.trajectories_by_lens(dispatched, tiny_tokenizer, tiny_pairs, ["logit", "causal"], prompt="raw")
    for lens in ("logit", "causal"):
        torch.testing.assert_close(got[lens].margin_a, want[lens].margin_a, **TOL)
        torch.testing.assert_close(got[lens].margin_b, want[lens].margin_b, **TOL)


def test_checksum_of_a_dispatched_model_is_that_of_the_plain_model(plain_and_dispatched):
    plain, dispatched = plain_and_dispatched
    assert state_checksum(dispatched) == state_checksum(plain)


#: The operators, each skipped without the extra of the optional library it runs through.
OPERATOR_PARAMS = [operator_param(op) for op in OPERATORS]


@pytest.mark.parametrize("op", OPERATOR_PARAMS)
def test_every_operator_degrades_and_restores_a_disk_offloaded_model(op, tmp_path, tiny_tokenizer, tiny_pairs):
    """Each operator changes the dispatched model exactly as it changes the plain one (same degraded margins), and
    leaving the context restores it (``verify=True`` hashes the whole model; the checksum is the plain model's)."""
    plain = make_tiny_model("llama")
    dispatched = _by_max_memory(copy.deepcopy(plain), tmp_path / "offload")
    before = state_checksum(plain)
    if op in CALIBRATED_OPS:  # they calibrate a deep copy of the whole model, which an offloaded one cannot give
        with (
            pytest.raises(UnsupportedOperatorError, match=rf"^{op} calibrates a copy of the whole model"),
            degrade(dispatched, op, tokenizer=tiny_tokenizer, group_size=16),
        ):
            pass
        assert state_checksum(dispatched) == before
        return
    with degrade(plain, op, **PARAMS.get(op, {})):
        want = dipreg.trajectories(plain, tiny_tokenizer, tiny_pairs, prompt="raw")
    with degrade(dispatched, op, verify=True, **PARAMS.get(op, {})):
        got = dipreg.trajectories(dispatched, tiny_tokenizer, tiny_pairs, prompt="raw")
    intact = dipreg.trajectories(plain, tiny_tokenizer, tiny_pairs, prompt="raw")
    torch.testing.assert_close(got.did, want.did, **TOL)
    assert not torch.allclose(got.did, intact.did), f"{op} did not change the dispatched model"
    assert state_checksum(dispatched) == before


@pytest.mark.parametrize("op", ["late_svd", "mid_prune"])
def test_operators_on_meta_weights_held_in_cpu_memory(op, tmp_path, tiny_tokenizer, tiny_pairs):
    """The same with accelerate's CPU-memory offload (a dict weights map) and with the embedding on disk."""
    for place in (_cpu_memory_offload, _embedding_on_disk):
        plain = make_tiny_model("llama")
        dispatched = place(copy.deepcopy(plain), tmp_path / place.__name__)
        with degrade(plain, op, **PARAMS.get(op, {})):
            want = dipreg.trajectories(plain, tiny_tokenizer, tiny_pairs, prompt="raw")
        with degrade(dispatched, op, verify=True, **PARAMS.get(op, {})):
            got = dipreg.trajectories(dispatched, tiny_tokenizer, tiny_pairs, prompt="raw")
        torch.testing.assert_close(got.did, want.did, **TOL)
        assert state_checksum(dispatched) == state_checksum(plain)
