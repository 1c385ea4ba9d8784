"""The architecture table: one entry in ``dipreg.architectures.ARCHITECTURES`` makes a new model type work everywhere
(the adapter, the LoRA module, the MLP operators and the memory table), and an unknown type is refused by name."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dipreg.adapter import ModelAdapter
from dipreg.architectures import ARCHITECTURES, SUPPORTED_MODEL_TYPES, UnsupportedModelError, architecture
from dipreg.eval import degrade
from dipreg.memory import LORA_BYTES_PER_PARAM, memory_table
from dipreg.training.module import DipRegModule
from tests.conftest import make_tiny_model

#: LoRA on two of the Llama projections only, so that a module which used Llama's defaults instead of the entry
#: would adapt seven.
TOY = dataclasses.replace(ARCHITECTURES["llama"], lora_targets=("q_proj", "down_proj"))


def _toy_model():
    """A tiny Llama whose config calls itself ``toy``, a model type dipreg ships no entry for."""
    model = make_tiny_model("llama")
    model.config.model_type = "toy"
    return model


def test_an_unknown_model_type_is_refused_naming_it_and_the_supported_ones():
    with pytest.raises(UnsupportedModelError, match=r"LlamaForCausalLM \(model_type='toy'\).*llama, mistral"):
        ModelAdapter(_toy_model())
    with pytest.raises(UnsupportedModelError, match="gpt_neox"):
        architecture("toy")
    assert set(SUPPORTED_MODEL_TYPES) == {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gpt2", "gpt_neox"}


def test_one_entry_makes_a_new_model_type_work_in_the_adapter_lora_operators_and_memory(monkeypatch, tiny_tokenizer):
    monkeypatch.setitem(ARCHITECTURES, "toy", TOY)
    model = _toy_model()
    ids = torch.tensor([[1, 5, 9, 12, 3]])

    # the adapter: the last-layer lens margin is the model's own output-logit margin
    adapter = ModelAdapter(model)
    pos, neg = torch.tensor([7]), torch.tensor([11])
    with torch.no_grad():
        residuals = adapter.residuals(ids, torch.ones_like(ids), torch.tensor([4]))
        logits = model(input_ids=ids).logits[0, -1]
    torch.testing.assert_close(adapter.margin(residuals[-1], pos, neg), (logits[7] - logits[11]).view(1))

    # an MLP operator: it prunes the mid blocks through the entry's MLP layout and restores the model bit-exactly
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad(), degrade(model, "mid_prune") as report:
        assert report.details["intermediate_size"] == [32, 32]
        assert not torch.allclose(model(input_ids=ids).logits[0, -1], logits)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    # the LoRA module adapts exactly the entry's targets on every layer
    module = DipRegModule(model=model, tokenizer=tiny_tokenizer, r=4, alpha=8)
    lora_a = [name for name, _ in module.named_parameters() if ".lora_A." in name]
    adapted = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name in lora_a}
    assert adapted == {"q_proj", "down_proj"}
    lora_params = sum(p.numel() for p in module.parameters() if p.requires_grad)

    # the memory table counts the same LoRA parameters PEFT built
    rows = {row.name: row.bytes for row in memory_table(model.config, lora_r=4)}
    assert rows["LoRA optimizer state"] == lora_params * LORA_BYTES_PER_PARAM
