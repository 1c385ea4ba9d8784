"""Natural vignettes: counts, counterbalancing, identical option sets, determinism, and the prompt interventions."""

import dataclasses
import re
from collections import Counter

import pytest

from dipreg.eval.readouts.interventions import INTERVENTIONS, InterventionError, intervene
from dipreg.stimuli import StimulusError, Vignette, balanced_subset, load_vignettes


@pytest.fixture(scope="module")
def vignettes() -> list[Vignette]:
    return load_vignettes("vignettes")


def test_counts_families_and_subtypes(vignettes):
    assert len(vignettes) == 192 and len({v.id for v in vignettes}) == 192
    assert Counter(v.family for v in vignettes) == {"value_flip": 96, "role_binding": 96}
    role = Counter(v.subtype for v in vignettes if v.family == "role_binding")
    assert role == {"voice": 24, "cleft": 24, "participle": 24, "converse": 24}
    assert len(load_vignettes("value_flip")) == len(load_vignettes("role_binding")) == 96


def test_ab_order_is_counterbalanced_overall_and_within_every_subtype(vignettes):
    assert sum(v.answer_a == 0 for v in vignettes) == 96
    for family in ("value_flip", "role_binding"):
        for subtype in {v.subtype for v in vignettes if v.family == family}:
            group = [v for v in vignettes if v.family == family and v.subtype == subtype]
            assert sum(v.answer_a == 0 for v in group) == len(group) / 2, (family, subtype)


def test_value_flip_order_is_crossed_with_the_valence_of_ctx_a(vignettes):
    cells = Counter((v.lexical["valence_a"], v.answer_a) for v in vignettes if v.family == "value_flip")
    assert cells == {("good", 0): 24, ("good", 1): 24, ("bad", 0): 24, ("bad", 1): 24}


def test_both_contexts_show_identical_options_and_differ_only_in_the_story(vignettes):
    for v in vignettes:
        a, b = v.prompt("a", "Choose."), v.prompt("b", "Choose.")
        assert a != b and a.removeprefix(v.story_a) == b.removeprefix(v.story_b)
        assert f"A) {v.options[0]}\nB) {v.options[1]}" in a
        assert v.answer("a") != v.answer("b")


def test_role_binding_contexts_name_both_participants_in_the_same_order(vignettes):
    for v in (v for v in vignettes if v.family == "role_binding"):
        agent_a = v.options[v.answer_a]
        x, y = v.lexical["x"], v.lexical["y"]
        assert agent_a == x and v.options[v.answer_b] == y
        assert (v.story_a.index(x) < v.story_a.index(y)) == (v.story_b.index(x) < v.story_b.index(y))


def test_keys_identify_their_own_option_only(vignettes):
    for v in vignettes:
        for i, keys in enumerate(v.keys):
            for key in keys:
                pattern = rf"(?<!\w){re.escape(key)}(?!\w)"
                assert re.search(pattern, v.options[i], re.IGNORECASE) or v.family == "value_flip", (v.id, key)
                assert not re.search(pattern, v.options[1 - i], re.IGNORECASE), (v.id, key)


def test_balanced_subset_keeps_families_subtypes_and_ab_order_even(vignettes):
    subset = balanced_subset(vignettes, 48)
    assert len(subset) == 48 and len(set(subset)) == 48
    assert sum(v.answer_a == 0 for v in subset) == 24
    assert Counter(v.family for v in subset) == {"value_flip": 24, "role_binding": 24}
    assert set(Counter(v.subtype for v in subset).values()) == {6}
    positions = [vignettes.index(v) for v in subset]
    assert positions == sorted(positions)  # input order kept
    assert balanced_subset(vignettes, None) == vignettes == balanced_subset(vignettes, 1000)


def test_unknown_set_and_bad_records_are_clear_errors(vignettes):
    with pytest.raises(StimulusError, match=r"nope.*vignettes, value_flip, role_binding"):
        load_vignettes("nope")
    with pytest.raises(StimulusError, match="two different options"):
        dataclasses.replace(vignettes[0], options=("x", "x"))
    with pytest.raises(StimulusError, match="answer_a"):
        dataclasses.replace(vignettes[0], answer_a=2)


@pytest.mark.parametrize("name", list(INTERVENTIONS))
def test_every_intervention_rewrites_every_prompt_and_keeps_options_identical(vignettes, name):
    rewritten = intervene(name, vignettes)
    for before, after in zip(vignettes, rewritten, strict=True):
        assert after.prompt("a", "x") != before.prompt("a", "x")
        assert after.answer_a == before.answer_a and after.id == before.id
        a, b = after.prompt("a", "x"), after.prompt("b", "x")
        assert a.removeprefix(after.story_a) == b.removeprefix(after.story_b)
    assert intervene(name, vignettes) == rewritten  # deterministic


def test_synonym_and_paraphrase_and_schema_rewrite_what_they_say(vignettes):
    v = next(v for v in vignettes if v.family == "role_binding" and v.lexical.get("past") == "helped")
    s = intervene("synonym", [v])[0]
    assert "helped" not in s.prompt("a", "") and "assisted" in s.story_a and "assisted" in s.question
    assert intervene("paraphrase", [v])[0].question == v.paraphrase
    assert "(A) " in intervene("format_schema", [v])[0].prompt("b", "")
    with pytest.raises(InterventionError, match="choose from"):
        intervene("rephrase", [v])
