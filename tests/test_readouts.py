"""Readouts: the semantic readout against a hand computation, the semantic trajectory's last layer, constrained
decoding against an explicit step-by-step decoder, decision rules, and clear errors."""

import numpy as np
import pytest
import torch

from dipreg.batching import DEFAULT_PROMPT
from dipreg.eval.readouts.readout import (
    JUDGE_TEMPLATE,
    ReadoutError,
    ReadoutResult,
    ReadoutSession,
    build_readouts,
    run_readouts,
)
from dipreg.semantic import SCORING_INSTRUCTION, score_options, semantic_trajectories
from dipreg.stimuli import load_vignettes


@pytest.fixture(scope="module")
def few():
    """One value-flip and one role-binding vignette, with opposite A/B orders."""
    vignettes = load_vignettes()
    return [vignettes[2], vignettes[100]]


def _prompt_ids(tok, vignette, ctx):
    text = DEFAULT_PROMPT.render(vignette.prompt(ctx, SCORING_INSTRUCTION), tok)
    return tok(text, add_special_tokens=DEFAULT_PROMPT.add_special_tokens(tok))["input_ids"]


@pytest.mark.integration
def test_semantic_and_label_readouts_equal_a_hand_computation_with_a_plain_forward(default_model, few):
    model, tok = default_model
    session = ReadoutSession()
    results = run_readouts(model, tok, few, build_readouts(["semantic", "label"]), session)
    a_id, b_id = tok.encode(" A", add_special_tokens=False)[0], tok.encode(" B", add_special_tokens=False)[0]
    for i, v in enumerate(few):
        for ctx in ("a", "b"):
            prompt = _prompt_ids(tok, v, ctx)
            total = []
            for option in v.options:
                option_ids = tok.encode(" " + option, add_special_tokens=False)
                with torch.no_grad():
                    logp = model(torch.tensor([prompt + option_ids])).logits[0].log_softmax(-1)
                total.append(sum(logp[len(prompt) - 1 + k, t].item() for k, t in enumerate(option_ids)))
                label_logits = model(torch.tensor([prompt])).logits[0, -1].detach() if option == v.options[0] else None
                if label_logits is not None:
                    labels = [label_logits[a_id].item(), label_logits[b_id].item()]
            pos, neg = v.answer_a, 1 - v.answer_a
            semantic = getattr(results["semantic"], f"margin_{ctx}")[i]
            label = getattr(results["label"], f"margin_{ctx}")[i]
            assert semantic == pytest.approx(total[pos] - total[neg], abs=1e-4)
            assert label == pytest.approx(labels[pos] - labels[neg], abs=1e-4)
    semantic = results["semantic"]
    assert np.array_equal(semantic.correct, semantic.did > 0)


@pytest.mark.integration
def test_semantic_trajectory_ends_at_the_semantic_readout(default_model, few):
    model, tok = default_model
    traj = semantic_trajectories(model, tok, few, batch_size=3)
    readout = build_readouts(["semantic"])[0](model, tok, few)
    assert traj.num_layers == 30 and traj.lens == "semantic"
    assert traj.did[:, -1].numpy() == pytest.approx(readout.did, abs=1e-4)
    assert traj.margin_a[:, -1].numpy() == pytest.approx(readout.margin_a, abs=1e-4)
    assert (traj.max_wrong_dip >= 0).all()


@pytest.mark.integration
def test_scores_do_not_depend_on_the_batch(default_model, few):
    model, tok = default_model
    one = score_options(model, tok, few, layers="last", batch_size=1)
    many = score_options(model, tok, few, layers="last", batch_size=8)
    for name in ("logprob", "label", "branch"):
        assert torch.allclose(getattr(one, name), getattr(many, name), atol=1e-4), name


@pytest.mark.integration
def test_constrained_readout_equals_step_by_step_constrained_greedy_decoding(default_model, few):
    model, tok = default_model
    result = build_readouts(["constrained"])[0](model, tok, few)
    for i, v in enumerate(few):
        options = [tok.encode(" " + o, add_special_tokens=False) for o in v.options]
        for ctx in ("a", "b"):
            prefix = _prompt_ids(tok, v, ctx)
            decoded: list[int] = []
            while not any(decoded == o for o in options):
                allowed = {o[len(decoded)] for o in options if o[: len(decoded)] == decoded and len(o) > len(decoded)}
                with torch.no_grad():
                    logits = model(torch.tensor([prefix + decoded])).logits[0, -1]
                decoded.append(max(allowed, key=lambda t: logits[t].item()))
            assert getattr(result, f"choice_{ctx}")[i] == options.index(decoded)


@pytest.mark.integration
def test_readouts_restore_the_model_mode(default_model, few):
    model, tok = default_model
    model.train()
    try:
        run_readouts(model, tok, few[:1], build_readouts(["label", "free"], max_new_tokens=2))
        assert model.training
    finally:
        model.eval()


@pytest.mark.integration
def test_judge_readout_with_the_default_model_as_judge(default_model, few):
    model, tok = default_model
    session = ReadoutSession()
    free, judge = run_readouts(model, tok, few, build_readouts(["free", "judge"], judge=(model, tok)), session).values()
    assert judge.texts_a == free.texts_a  # the judge classifies the free readout's own answers
    # The rule, recomputed with a plain forward of the judge: option A when logit(" A") > logit(" B"), else B;
    # an empty answer is undecided; the margin is that gap, signed toward the ctx_a-correct option.
    a_id, b_id = tok.encode(" A", add_special_tokens=False)[0], tok.encode(" B", add_special_tokens=False)[0]
    for texts, choices, margins in (
        (judge.texts_a, judge.choice_a, judge.margin_a),
        (judge.texts_b, judge.choice_b, judge.margin_b),
    ):
        for v, text, choice, margin in zip(few, texts, choices, margins, strict=True):
            query = JUDGE_TEMPLATE.format(question=v.question, first=v.options[0], second=v.options[1], response=text)
            ids = tok(DEFAULT_PROMPT.render(query, tok), add_special_tokens=DEFAULT_PROMPT.add_special_tokens(tok))
            with torch.no_grad():
                logits = model(torch.tensor([ids["input_ids"]])).logits[0, -1]
            gap = float(logits[a_id] - logits[b_id])
            assert choice == ((0 if gap > 0 else 1) if text.strip() else None), (v.id, text, gap)
            assert margin == pytest.approx((1.0 if v.answer_a == 0 else -1.0) * gap, abs=1e-3)


def test_decisions_and_pair_rules_from_margins(few):
    # few[0] has the ctx_a-correct option second (answer_a = 1), few[1] first.
    answer_a = [v.answer_a for v in few]
    assert sorted(answer_a) == [0, 1]
    result = ReadoutResult.from_margins("x", few, torch.tensor([2.0, 1.0]), torch.tensor([-1.0, 3.0]), "did")
    assert result.choice_a == [answer_a[0], answer_a[1]]
    assert result.choice_b == [1 - answer_a[0], answer_a[1]]
    assert result.did.tolist() == [3.0, -2.0]
    assert result.correct.tolist() == [True, False] and result.strict_correct.tolist() == [True, False]
    tie = ReadoutResult.from_margins("x", few, torch.tensor([0.0, 1.0]), torch.tensor([-1.0, -1.0]), "both")
    assert tie.choice_a[0] is None and tie.correct.tolist() == [False, True]
    # DiD > 0 counts as correct at the DiD level even when both contexts pick the same option.
    same = ReadoutResult.from_margins("x", few, torch.tensor([3.0, 3.0]), torch.tensor([1.0, 1.0]), "did")
    assert same.correct.tolist() == [True, True] and same.strict_correct.tolist() == [False, False]
    assert same.summary()["undecided_rate"] == 0.0


def test_unknown_or_incomplete_readouts_are_clear_errors():
    with pytest.raises(ReadoutError, match=r"'lens'.*choose from: label, semantic"):
        build_readouts(["semantic", "lens"])
    with pytest.raises(ReadoutError, match="--judge"):
        build_readouts(["judge"])
    with pytest.raises(ReadoutError, match="repeat"):
        build_readouts(["free", "free"])
