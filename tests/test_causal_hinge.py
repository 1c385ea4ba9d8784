"""CausalMarginHinge and TunedMarginHinge on tiny random models: values against the lenses, gradient routing."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from dipreg.lenses.causal import CausalLens, naive_causal_margins
from dipreg.lenses.tuned import TunedLens
from dipreg.losses import BatchView, CausalMarginHinge, TunedMarginHinge, WrongMarginHinge
from dipreg.training.module import DipRegModule
from tests.conftest import make_tiny_model

NEUTRAL = "king king . hello hello . ?"  # every word is a token of the tiny tokenizer


def _module(tokenizer, **kwargs) -> DipRegModule:
    """A LoRA module on a tiny Llama with random (non-zero) LoRA B weights, so the adapter changes every block."""
    module = DipRegModule(model=make_tiny_model("llama"), tokenizer=tokenizer, r=4, alpha=8, dropout=0.0, **kwargs)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return module


def _view(module: DipRegModule, tokenizer) -> BatchView:
    """Residuals of a real training forward (with graph) of three hand-written contexts."""
    texts = ["Alice chased Bob . Who chased ?", "is it good to help ?", "ice is not cold . True or False ?"]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    last = enc["attention_mask"].sum(1) - 1
    with module.adapter.capture(last) as slots:
        module.adapter.backbone(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False)
    correct = torch.tensor(tokenizer.convert_tokens_to_ids(["Alice", "Yes", "True"]))
    wrong = torch.tensor(tokenizer.convert_tokens_to_ids(["Bob", "No", "False"]))
    return BatchView(torch.stack(slots), correct, wrong, module.adapter)


@pytest.mark.parametrize("min_band_rows", [1, 64])
def test_causal_hinge_margins_equal_the_causal_lens_on_the_same_residuals(tiny_tokenizer, min_band_rows):
    module = _module(tiny_tokenizer).eval()
    view = _view(module, tiny_tokenizer)
    hinge = CausalMarginHinge(neutral_prompt=NEUTRAL, tokenizer=tiny_tokenizer, min_band_rows=min_band_rows)
    layers = [1, 3, 4, 7]  # 0-based, 7 = the last block
    got = hinge.transplant_margins(view.adapter, view.residuals[layers], layers, view.correct_ids, view.wrong_ids)
    with torch.no_grad():
        lens = CausalLens(view.adapter, tiny_tokenizer, neutral_prompt=NEUTRAL)
        expected = lens.margins(view.adapter, view.residuals.detach(), view.correct_ids, view.wrong_ids)[layers]
        naive = naive_causal_margins(
            view.adapter, lens.neutral_ids, view.residuals.detach(), view.correct_ids, view.wrong_ids
        )[layers]
    assert got.requires_grad
    torch.testing.assert_close(got.detach(), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.detach(), naive, atol=1e-4, rtol=1e-4)


def test_causal_hinge_at_the_last_layer_equals_the_logit_lens_hinge(tiny_tokenizer):
    module = _module(tiny_tokenizer).eval()
    view = _view(module, tiny_tokenizer)
    final = view.adapter.margin(view.residuals[-1], view.correct_ids, view.wrong_ids)
    delta = float(final.median())  # some rows pay, some do not
    causal = CausalMarginHinge(window=(1.0, 1.0), delta=delta, neutral_prompt=NEUTRAL, tokenizer=tiny_tokenizer)
    logit = WrongMarginHinge(window=(1.0, 1.0), delta=delta)
    expected = torch.relu(delta - final).mean()
    assert float(expected) > 0
    torch.testing.assert_close(causal(view), logit(view), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(causal(view), expected, atol=1e-5, rtol=1e-5)


def _lora_grads(module: DipRegModule, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    module.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in module.named_parameters() if "lora_" in n and p.grad is not None}


def _block(name: str) -> int:
    return int(name.split(".layers.")[1].split(".")[0])


def test_gradient_reaches_lora_after_l_through_the_transplant_and_before_l_only_through_h_l(tiny_tokenizer):
    """One sampled ℓ (0-based block 3 of 8): LoRA of blocks 4..7 gets gradient only from the transplant forward;
    LoRA of blocks 0..3 gets exactly (∂loss/∂h_ℓ)·(∂h_ℓ/∂θ) through the training forward; the base gets none."""
    module = _module(tiny_tokenizer).train()
    kwargs = {"window": (0.5, 0.5), "delta": 100.0, "neutral_prompt": NEUTRAL, "tokenizer": tiny_tokenizer}
    hinge = CausalMarginHinge(**kwargs)
    assert hinge.window_layers(8) == [3]

    attached = _lora_grads(module, hinge(_view(module, tiny_tokenizer)))
    assert all(not p.requires_grad and p.grad is None for n, p in module.named_parameters() if "lora_" not in n)
    detached = _lora_grads(module, CausalMarginHinge(**kwargs, detach_residual=True)(_view(module, tiny_tokenizer)))

    # the reference for blocks <= ℓ: the chain rule through h_ℓ, computed by hand with two autograd calls
    view = _view(module, tiny_tokenizer)
    h = view.residuals[3]
    h_leaf = h.detach().requires_grad_(True)
    loss = torch.relu(
        100.0 - hinge.transplant_margins(view.adapter, h_leaf[None], [3], view.correct_ids, view.wrong_ids)
    ).mean()
    (dloss_dh,) = torch.autograd.grad(loss, h_leaf)
    early = [(n, p) for n, p in module.named_parameters() if "lora_" in n and _block(n) <= 3]
    chain = torch.autograd.grad(h, [p for _, p in early], grad_outputs=dloss_dh, allow_unused=True)

    late_names = {n for n, _ in module.named_parameters() if "lora_" in n and _block(n) > 3}
    assert late_names and all(float(attached[n].abs().sum()) > 0 for n in late_names)
    for name in late_names:  # blocks after ℓ: the transplant path alone (h_ℓ does not depend on them)
        torch.testing.assert_close(attached[name], detached[name])
    for (name, _), expected in zip(early, chain, strict=True):
        assert name not in detached or float(detached[name].abs().sum()) == 0.0
        torch.testing.assert_close(attached[name], expected)
        assert float(expected.abs().sum()) > 0


def test_gradient_checkpointing_gives_the_same_causal_hinge(tiny_tokenizer):
    kwargs = {"delta": 100.0, "layers_per_step": 3, "seed": 5, "neutral_prompt": NEUTRAL, "tokenizer": tiny_tokenizer}
    plain = _module(tiny_tokenizer).train()
    value = CausalMarginHinge(**kwargs)(_view(plain, tiny_tokenizer))
    checkpointed = _module(tiny_tokenizer, gradient_checkpointing=True).train()
    torch.testing.assert_close(CausalMarginHinge(**kwargs)(_view(checkpointed, tiny_tokenizer)), value)


def test_layer_sampling_is_seeded_distinct_and_inside_the_window():
    layers = list(range(9, 26))
    a = CausalMarginHinge(layers_per_step=3, seed=4)
    b = CausalMarginHinge(layers_per_step=3, seed=4)
    draws = [a.sample_layers(layers) for _ in range(20)]
    assert draws == [b.sample_layers(layers) for _ in range(20)]
    assert all(len(set(d)) == 3 and set(d) <= set(layers) and d == sorted(d) for d in draws)
    assert len({tuple(d) for d in draws}) > 1  # a new draw every step
    assert CausalMarginHinge(layers_per_step=5).sample_layers([2, 3]) == [2, 3]


def test_sampled_layers_are_uniform_over_the_window_and_follow_the_runs_seed():
    """Every window layer is drawn with probability k/n (3000 draws of 3 of 17 layers: each count within 6 sd of
    3000·3/17), and without a seed of its own the hinge follows the run's seed (``seed_everything``)."""
    layers = list(range(9, 26))
    hinge = CausalMarginHinge(layers_per_step=3, seed=0)
    counts = Counter(layer for _ in range(3000) for layer in hinge.sample_layers(layers))
    p = 3 / len(layers)
    assert set(counts) == set(layers)
    assert all(abs(counts[layer] - 3000 * p) < 6 * math.sqrt(3000 * p * (1 - p)) for layer in layers), counts

    def first_draws(run_seed: int) -> list[list[int]]:
        torch.manual_seed(run_seed)
        unseeded = CausalMarginHinge(layers_per_step=3)
        return [unseeded.sample_layers(layers) for _ in range(5)]

    assert first_draws(11) == first_draws(11) != first_draws(12)


@pytest.mark.parametrize(("kwargs", "message"), [({"layers_per_step": 0}, "layers_per_step"), ({"seed": -1}, "seed")])
def test_causal_hinge_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CausalMarginHinge(**kwargs)


def test_tuned_hinge_reads_through_a_frozen_tuned_lens(tiny_tokenizer, tmp_path):
    module = _module(tiny_tokenizer).train()
    view = _view(module, tiny_tokenizer)
    lens = TunedLens(8, 32)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lens.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    path = lens.save(tmp_path / "tl" / "tuned-lens.pt")
    hinge = TunedMarginHinge(tuned_lens=str(path.parent), delta=100.0)
    value = hinge(view)
    # by hand: T_ℓ(h) = h + A h + b at blocks 3..6 (0-based, window 0.30-0.85 of 8), then the logit-lens margin
    h = view.residuals.detach()
    weights = [(lens.translators[i].weight, lens.translators[i].bias) for i in (2, 3, 4, 5)]
    translated = torch.stack([h[i] + h[i] @ a.T + b for i, (a, b) in zip((2, 3, 4, 5), weights, strict=True)])
    expected = torch.relu(100.0 - view.adapter.margin(translated, view.correct_ids, view.wrong_ids)).mean()
    torch.testing.assert_close(value.detach(), expected, atol=1e-5, rtol=1e-5)
    value.backward()
    assert hinge.lens is not None and all(p.grad is None and not p.requires_grad for p in hinge.lens.parameters())
    lora_b = [p for n, p in module.named_parameters() if "lora_B" in n]
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in lora_b)


def test_tuned_hinge_with_a_missing_lens_says_how_to_train_one(tiny_tokenizer, tmp_path):
    module = _module(tiny_tokenizer)
    with pytest.raises(FileNotFoundError, match="tuned-lens train"):
        TunedMarginHinge(tuned_lens=str(tmp_path / "none"))(_view(module, tiny_tokenizer))
