"""The causal (patchscope) lens: the cached, batched transplant equals the naive one-forward-per-item-per-layer
transplant on every architecture and on the real default model; ℓ = L equals the logit lens; the model and the
prefix cache are left untouched."""

import pytest
import torch

import dipreg
from dipreg.adapter import ModelAdapter
from dipreg.batching import context_batches
from dipreg.lenses.causal import DEFAULT_NEUTRAL_PROMPT, CausalLens, naive_causal_margins
from dipreg.prompting import PromptFormat
from dipreg.stimuli import candidate_token_ids, load_pairs


def answer_residuals(model, tokenizer, pairs):
    """Residuals ``(L, 2N, D)`` at the answer position of ctx_a, ctx_b of every pair (interleaved), and the ids."""
    adapter = ModelAdapter(model)
    (batch,) = context_batches(tokenizer, pairs, 2 * len(pairs), adapter, PromptFormat())
    residuals = torch.empty(adapter.num_layers, 2 * len(pairs), adapter.lm_head.weight.shape[-1])
    with torch.no_grad():
        residuals[:, batch.rows] = adapter.residuals(batch.input_ids, batch.attention_mask, batch.last)
    pos, neg = candidate_token_ids(pairs, tokenizer)
    return adapter, residuals, torch.tensor(pos).repeat_interleave(2), torch.tensor(neg).repeat_interleave(2)


@pytest.mark.parametrize("min_band_rows", [1, 20, 512], ids=["band-of-1-layer", "band-of-3-layers", "one-band"])
def test_fast_causal_equals_naive_transplant_on_every_architecture(
    tiny_model, tiny_tokenizer, tiny_pairs, min_band_rows
):
    adapter, residuals, pos, neg = answer_residuals(tiny_model, tiny_tokenizer, tiny_pairs)
    # chunks of 7 rows cut across layers and items; bands of source layers skip the blocks before them
    lens = CausalLens(adapter, tiny_tokenizer, max_batch_rows=7, min_band_rows=min_band_rows)
    fast = lens.margins(adapter, residuals, pos, neg)
    naive = naive_causal_margins(adapter, lens.neutral_ids, residuals, pos, neg)
    assert fast.shape == (8, 2 * len(tiny_pairs))
    assert naive.abs().max() > 1e-2, "margins too close to zero for the comparison to mean anything"
    torch.testing.assert_close(fast, naive, atol=1e-4, rtol=0)


def test_last_source_layer_equals_the_logit_lens_at_L(tiny_model, tiny_tokenizer, tiny_pairs):
    causal = dipreg.trajectories(tiny_model, tiny_tokenizer, tiny_pairs, lens="causal")
    logit = dipreg.trajectories(tiny_model, tiny_tokenizer, tiny_pairs, lens="logit")
    torch.testing.assert_close(causal.margin_a[:, -1], logit.margin_a[:, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(causal.margin_b[:, -1], logit.margin_b[:, -1], atol=1e-5, rtol=0)
    assert not torch.allclose(causal.did[:, :-1], logit.did[:, :-1], atol=1e-3), "mid layers should differ"


def test_trajectories_causal_lens_reads_the_answer_residuals(llama_tiny, tiny_tokenizer, tiny_pairs):
    traj = dipreg.trajectories(llama_tiny, tiny_tokenizer, tiny_pairs, lens="causal", batch_size=3)
    adapter, residuals, pos, neg = answer_residuals(llama_tiny, tiny_tokenizer, tiny_pairs)
    naive = naive_causal_margins(adapter, CausalLens(adapter, tiny_tokenizer).neutral_ids, residuals, pos, neg)
    torch.testing.assert_close(traj.margin_a, naive[:, 0::2].T, atol=1e-4, rtol=0)
    torch.testing.assert_close(traj.margin_b, naive[:, 1::2].T, atol=1e-4, rtol=0)
    assert traj.lens == "causal"


def test_model_and_prefix_cache_are_unchanged_by_repeated_calls(llama_tiny, tiny_tokenizer, tiny_pairs):
    before = {k: v.clone() for k, v in llama_tiny.state_dict().items()}
    adapter, residuals, pos, neg = answer_residuals(llama_tiny, tiny_tokenizer, tiny_pairs)
    lens = CausalLens(adapter, tiny_tokenizer, max_batch_rows=5, min_band_rows=1)
    cache = [(k.clone(), v.clone()) for k, v, *_ in lens._prefix.layers()]
    first = lens.margins(adapter, residuals, pos, neg)
    second = lens.margins(adapter, residuals, pos, neg)
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    for (k, v), (k2, v2, *_) in zip(cache, lens._prefix.layers(), strict=True):
        assert torch.equal(k, k2) and torch.equal(v, v2)
    after = llama_tiny.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(layer._forward_hooks for layer in adapter.layers), "hooks must be removed"
    assert not any("forward" in layer.__dict__ for layer in adapter.layers), "skipped blocks must be restored"


def test_skipped_blocks_get_back_a_forward_set_on_the_instance(llama_tiny, tiny_tokenizer, tiny_pairs):
    adapter, residuals, pos, neg = answer_residuals(llama_tiny, tiny_tokenizer, tiny_pairs)
    block = adapter.layers[0]
    own_forward = block.forward  # what an offloading hook (accelerate) would have installed
    block.forward = own_forward
    CausalLens(adapter, tiny_tokenizer, min_band_rows=1).margins(adapter, residuals, pos, neg)
    assert block.__dict__["forward"] is own_forward


def test_neutral_prompt_is_a_parameter(llama_tiny, tiny_tokenizer, tiny_pairs):
    default = dipreg.trajectories(llama_tiny, tiny_tokenizer, tiny_pairs, lens="causal")
    other = dipreg.trajectories(
        llama_tiny, tiny_tokenizer, tiny_pairs, lens="causal", neutral_prompt="cat cat\ndog dog\n?"
    )
    assert not torch.allclose(default.did[:, :-1], other.did[:, :-1], atol=1e-3)
    assert "king king" in DEFAULT_NEUTRAL_PROMPT


def test_one_token_neutral_prompt_is_rejected(llama_tiny, tiny_tokenizer, tiny_pairs):
    with pytest.raises(ValueError, match="neutral prompt"):
        dipreg.trajectories(llama_tiny, tiny_tokenizer, tiny_pairs, lens="causal", neutral_prompt="?")


@pytest.mark.integration
def test_fast_causal_equals_naive_transplant_on_the_default_model(default_model):
    model, tokenizer = default_model
    core = load_pairs("core")
    sample = [next(p for p in core if p.family == family) for family in ("negation", "value_flip")]
    adapter, residuals, pos, neg = answer_residuals(model, tokenizer, sample)
    naive = naive_causal_margins(adapter, CausalLens(adapter, tokenizer).neutral_ids, residuals, pos, neg)
    for min_band_rows in (1, 12, 512):  # one forward per source layer, bands of 3 layers, one band
        fast = CausalLens(adapter, tokenizer, min_band_rows=min_band_rows).margins(adapter, residuals, pos, neg)
        assert fast.shape == (30, 4)
        torch.testing.assert_close(fast, naive, atol=1e-4, rtol=0)
    torch.testing.assert_close(fast[-1], adapter.margin(residuals[-1], pos, neg), atol=1e-4, rtol=0)


def test_bench_section_reports_both_causal_ratios(llama_tiny, tiny_tokenizer, tiny_pairs):
    from dipreg.bench.causal import causal_section
    from dipreg.bench.core import BenchContext

    ratios = {r.name: r for r in causal_section(BenchContext(llama_tiny, tiny_tokenizer, tiny_pairs, 4, 1))}
    assert set(ratios) == {"causal_vs_naive_speedup", "causal_vs_lens_ratio"}
    assert all(r.value > 0 for r in ratios.values())
    assert "all 8 layers" in ratios["causal_vs_naive_speedup"].detail
