"""The compositional splits of §6.1: sizes, held-out factors, and the zero-overlap audit of the strict-240 set."""

import dataclasses

import pytest

from dipreg.stimuli import StimulusError, audit_single_token, load_pairs
from dipreg.stimuli.compositional import audit_held_out, audit_no_overlap


def _items(pairs, key):
    return {p.lexical[key] for p in pairs}


def test_split_sizes_match_the_paper():
    sizes = {name: len(load_pairs(name)) for name in ("comp_train", "comp_loose", "comp_strict", "strict240")}
    assert sizes == {"comp_train": 398, "comp_loose": 142, "comp_strict": 25, "strict240": 240}


def test_ids_are_unique_across_the_splits():
    all_ids = [p.id for name in ("comp_train", "comp_loose", "comp_strict", "strict240") for p in load_pairs(name)]
    assert len(all_ids) == len(set(all_ids))


def test_strict_holds_out_verbs_and_frames_and_loose_exactly_one_factor():
    train = load_pairs("comp_train")
    verbs, frames = _items(train, "verb"), _items(train, "frame")
    for pair in load_pairs("comp_strict"):
        assert pair.lexical["verb"] not in verbs and pair.lexical["frame"] not in frames
    for pair in load_pairs("comp_loose"):
        assert (pair.lexical["verb"] not in verbs) + (pair.lexical["frame"] not in frames) == 1


def test_strict240_shares_no_verb_frame_template_or_name_with_train():
    train, strict = load_pairs("comp_train"), load_pairs("strict240")
    train_words = {p.lexical[k] for p in train for k in ("verb", "participle", "frame", "template", "x", "y")}
    strict_words = {p.lexical[k] for p in strict for k in ("verb", "participle", "frame", "template", "x", "y")}
    assert not train_words & strict_words
    assert len(_items(strict, "verb")) * len(_items(strict, "frame")) * len(_items(strict, "x")) == 240


def test_overlap_audit_raises_and_names_the_leaked_item():
    train = load_pairs("comp_train")
    leaked = [
        dataclasses.replace(load_pairs("strict240")[0], lexical={**load_pairs("strict240")[0].lexical, "x": "John"})
    ]
    with pytest.raises(StimulusError, match="John"):
        audit_no_overlap(train, leaked)


def test_held_out_audit_rejects_a_training_item_posing_as_strict():
    train = load_pairs("comp_train")
    with pytest.raises(StimulusError, match="comp_train-000"):
        audit_held_out(train, train[:1], "strict")


@pytest.mark.integration
def test_every_answer_is_one_token_for_the_default_tokenizer(default_model):
    _, tokenizer = default_model
    for name in ("comp_train", "comp_loose", "comp_strict", "strict240"):
        audit_single_token(load_pairs(name), tokenizer)
