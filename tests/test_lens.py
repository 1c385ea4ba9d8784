"""The model adapter and the logit lens: exact last-layer margins on every architecture, batching invariance."""

import copy
from dataclasses import replace

import pytest
import torch
from peft import LoraConfig, get_peft_model

import dipreg
from dipreg.adapter import ModelAdapter, UnsupportedModelError
from dipreg.batching import context_batches, shared_prefix_batches, shared_prefix_length
from dipreg.stimuli import MinimalPair, StimulusError


def output_margins(model, tokenizer, pairs):
    """The model's own output-logit margins, one context at a time, through the full CausalLM forward."""
    rows = []
    for pair in pairs:
        pos = tokenizer.encode(pair.t_pos, add_special_tokens=False)[0]
        neg = tokenizer.encode(pair.t_neg, add_special_tokens=False)[0]
        margins = []
        for ctx in (pair.ctx_a, pair.ctx_b):
            ids = torch.tensor([tokenizer(ctx)["input_ids"]])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, -1]
            margins.append((logits[pos] - logits[neg]).item())
        rows.append(margins)
    return torch.tensor(rows)


def test_last_layer_lens_margin_equals_the_models_output_margin(tiny_model, tiny_tokenizer, tiny_pairs):
    traj = dipreg.trajectories(tiny_model, tiny_tokenizer, tiny_pairs, batch_size=3)
    expected = output_margins(tiny_model, tiny_tokenizer, tiny_pairs)
    assert expected.abs().max() > 1e-3, "margins too close to zero for the comparison to mean anything"
    torch.testing.assert_close(traj.margin_a[:, -1], expected[:, 0], atol=1e-4, rtol=0)
    torch.testing.assert_close(traj.margin_b[:, -1], expected[:, 1], atol=1e-4, rtol=0)


def test_softcap_is_applied_by_the_gemma2_lens(tiny_tokenizer, tiny_pairs):
    from conftest import make_tiny_model

    model = make_tiny_model("gemma2")
    adapter = ModelAdapter(model)
    assert adapter.softcap == pytest.approx(0.5)
    traj = dipreg.trajectories(model, tiny_tokenizer, tiny_pairs)
    # every softcapped margin is bounded by 2·cap; without the cap the raw margins would exceed it
    assert traj.margin_a.abs().max() <= 1.0 + 1e-6
    adapter.softcap = None
    raw = dipreg.trajectories(model, tiny_tokenizer, tiny_pairs, lens=_FixedAdapterLens(adapter))
    assert not torch.allclose(raw.margin_a[:, -1], traj.margin_a[:, -1], atol=1e-4)


class _FixedAdapterLens:
    """A logit lens that reads through a given (modified) adapter."""

    name = "logit"

    def __init__(self, adapter):
        self.adapter = adapter

    def margins(self, adapter, residuals, pos_ids, neg_ids):
        return self.adapter.margin(residuals, pos_ids, neg_ids)


def test_final_norm_is_applied_per_layer_not_cached(llama_tiny, tiny_tokenizer, tiny_pairs):
    """Each layer's margin uses the norm of its own residual (the TransformerLens recompute_ln bug)."""
    adapter = ModelAdapter(llama_tiny)
    ids = torch.tensor([tiny_tokenizer(tiny_pairs[0].ctx_a)["input_ids"]])
    last = torch.tensor([ids.shape[1] - 1])
    residuals = adapter.residuals(ids, torch.ones_like(ids), last)
    pos, neg = torch.tensor([2]), torch.tensor([3])
    per_layer = torch.stack([adapter.margin(residuals[i], pos, neg) for i in range(adapter.num_layers)])
    torch.testing.assert_close(adapter.margin(residuals, pos, neg), per_layer)
    # a single cached scale from the last layer gives different margins in the middle
    rms_last = residuals[-1].pow(2).mean(-1, keepdim=True).add(1e-6).rsqrt()
    cached = (residuals * rms_last * adapter.final_norm.weight) @ (
        adapter.lm_head.weight[pos] - adapter.lm_head.weight[neg]
    ).T
    assert not torch.allclose(cached[:-1, :, 0], per_layer[:-1], atol=1e-3)


def test_batched_equals_one_at_a_time(tiny_model, tiny_tokenizer, tiny_pairs):
    batched = dipreg.trajectories(tiny_model, tiny_tokenizer, tiny_pairs, batch_size=8)
    for i, pair in enumerate(tiny_pairs):
        single = dipreg.trajectories(tiny_model, tiny_tokenizer, [pair], batch_size=1)
        torch.testing.assert_close(batched.did[i], single.did[0], atol=1e-5, rtol=1e-4)


def test_peft_wrapped_model_reads_the_same_trajectories(llama_tiny, tiny_tokenizer, tiny_pairs):
    plain = dipreg.trajectories(llama_tiny, tiny_tokenizer, tiny_pairs)
    wrapped = get_peft_model(llama_tiny, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert ModelAdapter(wrapped).num_layers == 8
    peft_traj = dipreg.trajectories(wrapped, tiny_tokenizer, tiny_pairs)  # LoRA B starts at zero
    torch.testing.assert_close(peft_traj.did, plain.did)


def test_lens_of_a_trained_lora_equals_its_output_and_its_merged_weights(tiny_model, tiny_tokenizer, tiny_pairs):
    """A LoRA with random, non-zero B (as after training): the last-layer lens margin equals the wrapped model's own
    output margin, and every layer equals the lens of the same adapter merged into plain weights."""
    plain = dipreg.trajectories(tiny_model, tiny_tokenizer, tiny_pairs)
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    wrapped = get_peft_model(copy.deepcopy(tiny_model), config).eval()
    lora = dipreg.trajectories(wrapped, tiny_tokenizer, tiny_pairs, batch_size=3)
    expected = output_margins(wrapped, tiny_tokenizer, tiny_pairs)
    torch.testing.assert_close(lora.margin_a[:, -1], expected[:, 0], atol=1e-4, rtol=0)
    torch.testing.assert_close(lora.margin_b[:, -1], expected[:, 1], atol=1e-4, rtol=0)
    assert (lora.did - plain.did).abs().max() > 1e-2, "the adapter must change the trajectories"
    merged = dipreg.trajectories(wrapped.merge_and_unload(), tiny_tokenizer, tiny_pairs)
    torch.testing.assert_close(lora.did, merged.did, atol=1e-4, rtol=1e-4)


def test_trajectories_restore_training_mode(llama_tiny, tiny_tokenizer, tiny_pairs):
    llama_tiny.train()
    dipreg.trajectories(llama_tiny, tiny_tokenizer, tiny_pairs)
    assert llama_tiny.training


def test_statistics_and_summary_are_consistent(llama_tiny, tiny_tokenizer, tiny_pairs):
    traj = dipreg.trajectories(llama_tiny, tiny_tokenizer, tiny_pairs)
    assert traj.did.shape == (len(tiny_pairs), 8)
    records = traj.item_records()
    assert [r["id"] for r in records] == [p.id for p in tiny_pairs]
    summary = traj.summary()
    assert summary["all"]["n"] == len(tiny_pairs)
    assert summary["all"]["accuracy"] == pytest.approx(sum(r["correct"] for r in records) / len(records))
    assert set(summary["families"]) == {"negation", "value_flip", "role_binding"}
    assert summary["safety"]["n"] == 1


def test_unsupported_architecture_is_named(tiny_tokenizer):
    from transformers import BertConfig, BertLMHeadModel

    model = BertLMHeadModel(
        BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            is_decoder=True,
        )
    )
    with pytest.raises(UnsupportedModelError, match="BertLMHeadModel"):
        ModelAdapter(model)


def test_context_longer_than_the_window_names_the_item(llama_tiny, tiny_tokenizer):
    long = MinimalPair(
        id="too-long",
        ctx_a=" ".join(["cat"] * 100),
        ctx_b=" ".join(["dog"] * 100),
        t_pos=" Yes",
        t_neg=" No",
        family="negation",
        safety=False,
    )
    with pytest.raises(StimulusError, match="too-long"):
        dipreg.trajectories(llama_tiny, tiny_tokenizer, [long])


def test_empty_pair_list_is_rejected(llama_tiny, tiny_tokenizer):
    with pytest.raises(StimulusError, match="No minimal pairs"):
        dipreg.trajectories(llama_tiny, tiny_tokenizer, [])


def test_unknown_lens_is_rejected(llama_tiny, tiny_tokenizer, tiny_pairs):
    with pytest.raises(ValueError, match="Unknown lens"):
        dipreg.trajectories(llama_tiny, tiny_tokenizer, tiny_pairs, lens="telescope")


def test_several_lenses_share_one_forward_and_equal_single_lens_runs(
    llama_tiny, tiny_tokenizer, tiny_pairs, monkeypatch
):
    calls = []
    capture = ModelAdapter.residuals
    monkeypatch.setattr(ModelAdapter, "residuals", lambda self, *a, **k: calls.append(1) or capture(self, *a, **k))
    both = dipreg.trajectories_by_lens(llama_tiny, tiny_tokenizer, tiny_pairs, ["logit", "causal"], batch_size=8)
    assert len(calls) == 1  # 8 contexts in one batch: one residual capture serves both lenses
    monkeypatch.setattr(ModelAdapter, "residuals", capture)
    for name in ("logit", "causal"):
        single = dipreg.trajectories(llama_tiny, tiny_tokenizer, tiny_pairs, lens=name, batch_size=8)
        torch.testing.assert_close(both[name].did, single.did)


PREAMBLE = "Question : Alice and Bob . "  # six tokens every context starts with, like a chat template's header


def test_shared_prefix_runs_once_and_reads_the_same_margins(tiny_model, tiny_tokenizer, tiny_pairs):
    pairs = [replace(p, ctx_a=PREAMBLE + p.ctx_a, ctx_b=PREAMBLE + p.ctx_b) for p in tiny_pairs]
    adapter = ModelAdapter(tiny_model)
    prefix, batches = shared_prefix_batches(tiny_tokenizer, pairs, 3, adapter)
    assert len(prefix) == 6
    full = context_batches(tiny_tokenizer, pairs, 3, adapter)
    assert [b.input_ids.shape[1] + 6 for b in batches] == [b.input_ids.shape[1] for b in full]
    shared = dipreg.trajectories_by_lens(tiny_model, tiny_tokenizer, pairs, ["logit", "causal"], batch_size=3)
    plain = dipreg.trajectories_by_lens(
        tiny_model, tiny_tokenizer, pairs, ["logit", "causal"], batch_size=3, share_prefix=False
    )
    for name in ("logit", "causal"):
        torch.testing.assert_close(shared[name].margin_a, plain[name].margin_a, atol=1e-5, rtol=0)
        torch.testing.assert_close(shared[name].margin_b, plain[name].margin_b, atol=1e-5, rtol=0)


def test_trajectories_passes_share_prefix_to_the_batching_not_to_the_lens(tiny_model, tiny_tokenizer, tiny_pairs):
    """``trajectories(share_prefix=False)`` runs every context whole: no prefix cache is built (a planted
    ``share_prefix`` that went to the lens options instead would build one, or fail in the lens)."""
    import dipreg.trajectory as trajectory_module

    pairs = [replace(p, ctx_a=PREAMBLE + p.ctx_a, ctx_b=PREAMBLE + p.ctx_b) for p in tiny_pairs]
    built: list[int] = []
    real = trajectory_module.PrefixCache

    def counting(adapter, prefix_ids):
        built.append(len(prefix_ids))
        return real(adapter, prefix_ids)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trajectory_module, "PrefixCache", counting)
        whole = dipreg.trajectories(tiny_model, tiny_tokenizer, pairs, batch_size=3, share_prefix=False)
        assert built == []
        shared = dipreg.trajectories(tiny_model, tiny_tokenizer, pairs, batch_size=3)
        assert built == [6]
    torch.testing.assert_close(whole.margin_a, shared.margin_a, atol=1e-5, rtol=0)


def test_the_logit_lens_names_an_option_it_does_not_take(tiny_model, tiny_tokenizer, tiny_pairs):
    with pytest.raises(ValueError, match="logit lens takes no options; got neutral_prompt"):
        dipreg.trajectories(tiny_model, tiny_tokenizer, tiny_pairs, neutral_prompt="x")


def test_shared_prefix_leaves_every_context_its_last_token():
    assert shared_prefix_length([[5, 6, 7], [5, 6, 7]]) == 2
    assert shared_prefix_length([[5, 6, 7], [5, 6]]) == 1
    assert shared_prefix_length([[5, 6], [4, 6]]) == 0


@pytest.mark.integration
def test_shared_chat_prefix_reads_the_same_margins_on_the_default_model(default_model):
    model, tokenizer = default_model
    pairs = dipreg.stimuli.load_pairs("core")[:3]
    prefix, _ = shared_prefix_batches(tokenizer, pairs, 6, ModelAdapter(model))
    assert len(prefix) > 10  # the chat template's system and user header
    shared = dipreg.trajectories(model, tokenizer, pairs)
    plain = dipreg.trajectories_by_lens(model, tokenizer, pairs, ["logit"], share_prefix=False)["logit"]
    torch.testing.assert_close(shared.margin_a, plain.margin_a, atol=1e-3, rtol=0)
    torch.testing.assert_close(shared.margin_b, plain.margin_b, atol=1e-3, rtol=0)


def test_progress_bar_counts_every_context_and_shows_count_and_eta(llama_tiny, tiny_tokenizer, tiny_pairs, monkeypatch):
    import io

    from rich.console import Console
    from rich.progress import MofNCompleteColumn, TimeRemainingColumn

    import dipreg.trajectory as trajectory_module

    made = []
    original = trajectory_module.progress_bar

    def recording_bar(*, disable: bool = False):
        bar = original(disable=disable)
        bar.live.console = Console(file=io.StringIO())
        made.append((disable, bar))
        return bar

    monkeypatch.setattr(trajectory_module, "progress_bar", recording_bar)
    dipreg.trajectories(llama_tiny, tiny_tokenizer, tiny_pairs, batch_size=3, progress=True)
    ((disable, bar),) = made
    assert not disable
    kinds = {type(column) for column in bar.columns}
    assert {MofNCompleteColumn, TimeRemainingColumn} <= kinds
    (task,) = bar.tasks
    assert task.total == 2 * len(tiny_pairs)
    assert task.completed == 2 * len(tiny_pairs)
