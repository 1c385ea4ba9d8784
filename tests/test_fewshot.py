"""The few-shot prompt style: worked examples from other pairs of the same family, never the item itself, chosen
deterministically; both contexts of a pair read the same examples; the shared KV prefix gives the same margins."""

from __future__ import annotations

import random

import pytest
import torch

from dipreg.batching import shared_prefix_length, tokenize_contexts
from dipreg.cli import build_parser
from dipreg.prompting import SHOT_SEPARATOR, PromptFormat
from dipreg.stimuli import MinimalPair, StimulusError, load_pairs
from dipreg.trajectory import trajectories_by_lens

FEWSHOT = PromptFormat("fewshot")


def split_shots(text: str, context: str) -> list[str]:
    """The worked-example blocks in front of ``context`` (reference parser: plain string operations)."""
    assert text.endswith(context)
    head = text[: len(text) - len(context)]
    assert head == "" or head.endswith(SHOT_SEPARATOR)
    return [block for block in head.split(SHOT_SEPARATOR) if block]


@pytest.fixture(scope="module")
def core_pairs() -> list[MinimalPair]:
    return load_pairs("core")


@pytest.fixture(scope="module")
def core_texts(core_pairs, tiny_tokenizer) -> list[str]:
    return FEWSHOT.render_pairs(core_pairs, tiny_tokenizer)


def test_every_item_reads_k_same_family_shots_with_their_correct_answers_and_never_itself(core_pairs, core_texts):
    # index every context of the set -> (pair, correct answer), built here from the records alone
    answer_of = {p.ctx_a: (p, p.t_pos) for p in core_pairs} | {p.ctx_b: (p, p.t_neg) for p in core_pairs}
    for i, pair in enumerate(core_pairs):
        blocks = split_shots(core_texts[2 * i], pair.ctx_a)
        assert len(blocks) == 3
        for block in blocks:
            source, answer = next((answer_of[c], c) for c in answer_of if block == c + answer_of[c][1])
            shot_pair, correct = source
            assert shot_pair.id != pair.id and answer not in (pair.ctx_a, pair.ctx_b)
            assert shot_pair.family == pair.family
            assert block.endswith(correct)
        assert len(set(blocks)) == 3  # three different examples


def test_both_contexts_of_a_pair_read_the_same_examples(core_pairs, core_texts):
    for i, pair in enumerate(core_pairs):
        assert core_texts[2 * i][: -len(pair.ctx_a)] == core_texts[2 * i + 1][: -len(pair.ctx_b)]


def test_shots_are_deterministic_and_independent_of_the_set_order(core_pairs, core_texts, tiny_tokenizer):
    assert FEWSHOT.render_pairs(core_pairs, tiny_tokenizer) == core_texts
    shuffled = list(core_pairs)
    random.Random(7).shuffle(shuffled)
    again = FEWSHOT.render_pairs(shuffled, tiny_tokenizer)
    by_id = {p.id: core_texts[2 * i] for i, p in enumerate(core_pairs)}
    assert all(again[2 * i] == by_id[p.id] for i, p in enumerate(shuffled))
    other_seed = PromptFormat("fewshot", seed=1).render_pairs(core_pairs, tiny_tokenizer)
    assert sum(a != b for a, b in zip(other_seed, core_texts, strict=True)) > len(core_texts) // 2


def test_shots_follow_k_and_a_small_family_gives_what_it_has(tiny_pairs, tiny_tokenizer):
    # value_flip holds val-0 and val-1 only: each is the other's single worked example, whatever k asks
    texts = PromptFormat("fewshot", shots=5).render_pairs(tiny_pairs[1::2], tiny_tokenizer)
    val0, val1 = tiny_pairs[1], tiny_pairs[3]
    assert texts[0] == val1.ctx_a + val1.t_pos + SHOT_SEPARATOR + val0.ctx_a or texts[0] == (
        val1.ctx_b + val1.t_neg + SHOT_SEPARATOR + val0.ctx_a
    )
    pairs = load_pairs("role_binding")
    for k in (1, 2, 6):
        text = PromptFormat("fewshot", shots=k).with_pool(pairs).render_pairs(pairs[:1], tiny_tokenizer)[0]
        assert len(split_shots(text, pairs[0].ctx_a)) == k


def test_a_family_with_one_pair_is_an_error_naming_the_item(tiny_pairs, tiny_tokenizer):
    with pytest.raises(StimulusError, match=r"'neg-0' is the only pair of family 'negation'"):
        FEWSHOT.render_pairs(tiny_pairs, tiny_tokenizer)
    with pytest.raises(ValueError, match="shots must be an integer >= 1"):
        PromptFormat("fewshot", shots=0)


def test_single_contexts_cannot_be_rendered_few_shot(tiny_tokenizer):
    with pytest.raises(ValueError, match="renders whole pair sets only"):
        FEWSHOT.render("Question : is it good ? Answer :", tiny_tokenizer)


def test_a_bound_pool_makes_a_shard_read_the_whole_sets_examples(core_pairs, core_texts, tiny_tokenizer):
    shard = core_pairs[1::2]
    bound = FEWSHOT.with_pool(core_pairs).render_pairs(shard, tiny_tokenizer)
    assert bound == [t for i, t in enumerate(core_texts) if (i // 2) % 2 == 1]
    assert FEWSHOT.render_pairs(shard, tiny_tokenizer) != bound  # unbound: examples drawn from the shard alone
    assert PromptFormat("raw").with_pool(core_pairs) == PromptFormat("raw")


def shared_start_pairs() -> list[MinimalPair]:
    """Six value_flip pairs in the tiny vocabulary whose contexts all start with 'Question : is it'."""
    acts = ["steal", "help", "steal a cat", "help a dog", "help the cat", "steal the dog"]
    return [
        MinimalPair(
            id=f"v{i}",
            ctx_a=f"Question : is it wrong to {act} ? Answer :",
            ctx_b=f"Question : is it right to {act} ? Answer :",
            t_pos=" Yes",
            t_neg=" No",
            family="value_flip",
            safety=False,
        )
        for i, act in enumerate(acts)
    ]


def test_shared_prefix_cache_gives_the_margins_of_plain_forwards(llama_tiny, tiny_tokenizer):
    pairs = shared_start_pairs()
    fmt = PromptFormat("fewshot", shots=2)
    encoded = tokenize_contexts(tiny_tokenizer, pairs, None, fmt)
    assert shared_prefix_length(encoded) >= 4  # the cache really runs ("Question : is it")
    assert len({tuple(ids[:20]) for ids in encoded}) > 1  # and the few-shot prefixes differ between items
    cached = trajectories_by_lens(llama_tiny, tiny_tokenizer, pairs, ["logit"], prompt=fmt, batch_size=3)["logit"]
    full = trajectories_by_lens(
        llama_tiny, tiny_tokenizer, pairs, ["logit"], prompt=fmt, batch_size=5, share_prefix=False
    )["logit"]
    torch.testing.assert_close(cached.margin_a, full.margin_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(cached.margin_b, full.margin_b, atol=1e-5, rtol=0)
    # independent reference: the model's own output logits, one unbatched forward per rendered context
    yes, no = (tiny_tokenizer.convert_tokens_to_ids(w) for w in ("Yes", "No"))
    with torch.no_grad():
        for row, ids in enumerate(encoded):
            logits = llama_tiny(torch.tensor([ids])).logits[0, -1]
            margins = cached.margin_a if row % 2 == 0 else cached.margin_b
            assert float(margins[row // 2, -1]) == pytest.approx(float(logits[yes] - logits[no]), abs=1e-4)


def test_cli_offers_fewshot_to_pair_commands_but_not_to_vignette_readouts():
    assert build_parser("audit").parse_args(["audit", "--prompt", "fewshot"]).prompt == "fewshot"
    assert build_parser("degrade").parse_args(["degrade", "--prompt", "fewshot"]).prompt == "fewshot"
    with pytest.raises(SystemExit):
        build_parser("bridge").parse_args(["bridge", "--prompt", "fewshot"])


def test_data_module_renders_training_pairs_few_shot(tiny_tokenizer):
    from dipreg.training.data import PairDataModule

    pairs = shared_start_pairs()
    dm = PairDataModule(train="comp_loose", val=[], prompt="fewshot", tokenizer=tiny_tokenizer)
    dm.train_pairs = pairs
    dm.setup("fit")
    expected = tiny_tokenizer(FEWSHOT.render_pairs(pairs, tiny_tokenizer))["input_ids"]
    assert [ids for ids, _, _ in dm._train] == expected


def test_the_audit_defaults_to_fewshot_and_says_so(monkeypatch, tmp_path, tiny_tokenizer):
    import io

    from rich.console import Console

    import dipreg.audit as audit_module

    pairs = shared_start_pairs()
    seen = {}

    def fake_trajectories(model, tokenizer, pairs, lenses, **kwargs):
        seen["prompt"] = kwargs["prompt"]
        return {"logit": dipreg_trajectories(pairs)}

    monkeypatch.setattr(audit_module, "load_pairs", lambda name: pairs)
    monkeypatch.setattr(audit_module, "load_model", lambda name: (None, tiny_tokenizer))
    monkeypatch.setattr(audit_module, "trajectories_by_lens", fake_trajectories)
    console = Console(file=io.StringIO(), width=400)
    payload = audit_module.run_audit(None, "core", ["logit"], tmp_path / "audit", console=console)
    assert seen["prompt"] == PromptFormat("fewshot", shots=3)
    assert payload["prompt"] == "fewshot" and payload["prompt_shots"] == 3
    assert "prompt style: fewshot (3 worked examples of the same family per item, seed 0)" in console.file.getvalue()
    assert build_parser("audit").parse_args(["audit"]).prompt == "fewshot"


def dipreg_trajectories(pairs):
    from dipreg.trajectory import Trajectories

    ramp = torch.linspace(0.2, 1.0, 4)
    return Trajectories(
        pairs=pairs,
        lens="logit",
        margin_a=torch.stack([ramp * (i + 1) for i in range(len(pairs))]),
        margin_b=torch.stack([-ramp for _ in pairs]),
    )


def test_a_sharded_probe_reads_the_examples_of_the_whole_probe_set(llama_tiny, tiny_tokenizer):
    from dipreg.callbacks.probe import DipProbe

    pairs = shared_start_pairs()
    probe = DipProbe(pairs, ("logit",), prompt="fewshot")
    whole = probe.run(llama_tiny, tiny_tokenizer).local["logit"]
    shard = probe.run(llama_tiny, tiny_tokenizer, rank=1, world_size=2).local["logit"]
    assert [p.id for p in shard.pairs] == ["v1", "v3", "v5"]
    torch.testing.assert_close(shard.margin_a, whole.margin_a[1::2], atol=1e-5, rtol=0)
    torch.testing.assert_close(shard.margin_b, whole.margin_b[1::2], atol=1e-5, rtol=0)
