"""Tests of dipreg.stimuli: built-in sets, JSONL I/O errors and the single-token audit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dipreg.stimuli import (
    BUILTIN_SETS,
    SAFETY_CATEGORIES,
    MinimalPair,
    StimulusError,
    audit_single_token,
    candidate_token_ids,
    generate_core,
    generate_role_binding,
    load_pairs,
    save_pairs,
)


@pytest.fixture(scope="module")
def smollm2_tokenizer(default_model):
    """The embedded default model's tokenizer (the session's real model; loading fails loudly if it is missing)."""
    return default_model[1]


def _record(**overrides) -> dict:
    record = {
        "id": "p1",
        "ctx_a": "Question: Is it wrong to lie? Answer (Yes or No):",
        "ctx_b": "Question: Is it right to lie? Answer (Yes or No):",
        "t_pos": " Yes",
        "t_neg": " No",
        "family": "value_flip",
        "safety": True,
        "category": "deception",
    }
    record.update(overrides)
    return record


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _operator_diff(a: str, b: str) -> tuple[list[str], list[str]]:
    """The words of a and b left after removing their longest common word prefix and suffix."""
    wa, wb = a.split(), b.split()
    p = 0
    while p < min(len(wa), len(wb)) and wa[p] == wb[p]:
        p += 1
    s = 0
    while s < min(len(wa), len(wb)) - p and wa[-1 - s] == wb[-1 - s]:
        s += 1
    return wa[p : len(wa) - s], wb[p : len(wb) - s]


def _is_contiguous_within(words: list[str], phrase: str) -> bool:
    slot = phrase.split()
    return any(slot[i : i + len(words)] == words for i in range(len(slot) - len(words) + 1))


def test_core_has_278_pairs_value_flip_negation_permission_in_order():
    families = [p.family for p in generate_core()]
    assert families == ["value_flip"] * 200 + ["negation"] * 48 + ["permission"] * 30


def test_role_binding_has_200_pairs():
    pairs = generate_role_binding()
    assert len(pairs) == 200
    assert {p.family for p in pairs} == {"role_binding"}


def test_builtin_names_load_the_generated_sets():
    assert BUILTIN_SETS == ("core", "role_binding", "comp_train", "comp_loose", "comp_strict", "strict240")
    assert load_pairs("core") == generate_core()
    assert load_pairs("role_binding") == generate_role_binding()


def test_builtin_ids_are_unique_and_numbered_per_family():
    pairs = generate_core() + generate_role_binding()
    assert len({p.id for p in pairs}) == len(pairs)
    assert pairs[0].id == "value_flip-000"
    assert pairs[200].id == "negation-000"
    assert pairs[-1].id == "role_binding-199"


@pytest.mark.parametrize("name", BUILTIN_SETS)
def test_contexts_differ_only_in_the_operator_slot(name):
    for pair in load_pairs(name):
        diff_a, diff_b = _operator_diff(pair.ctx_a, pair.ctx_b)
        assert diff_a or diff_b, f"{pair.id}: contexts are identical"
        assert _is_contiguous_within(diff_a, pair.lexical["op_a"]), (pair.id, diff_a)
        assert _is_contiguous_within(diff_b, pair.lexical["op_b"]), (pair.id, diff_b)
        assert pair.lexical["op_a"] != pair.lexical["op_b"]


@pytest.mark.parametrize("name", BUILTIN_SETS)
def test_both_candidates_appear_in_both_contexts(name):
    for pair in load_pairs(name):
        for ctx in (pair.ctx_a, pair.ctx_b):
            for cand in (pair.t_pos, pair.t_neg):
                assert cand.strip().lower() in ctx.lower(), (pair.id, cand)


def test_candidates_start_with_a_space_and_differ():
    for pair in generate_core() + generate_role_binding():
        assert pair.t_pos.startswith(" ") and pair.t_neg.startswith(" ")
        assert pair.t_pos != pair.t_neg


def test_value_flip_puts_the_negative_operator_in_ctx_a_for_bad_acts():
    pairs = [p for p in generate_core() if p.family == "value_flip"]
    for pair in pairs:
        positive, negative = pair.lexical["operator"].split("/")
        expected_a = positive if pair.lexical["valence"] == "good" else negative
        assert pair.lexical["op_a"] == expected_a
    assert {p.lexical["valence"] for p in pairs} == {"good", "bad"}


def test_core_has_both_safety_and_non_safety_items_with_valid_categories():
    pairs = generate_core()
    safety = [p for p in pairs if p.safety]
    assert 0.25 * len(pairs) < len(safety) < 0.75 * len(pairs)
    assert {p.category for p in safety} == set(SAFETY_CATEGORIES)
    assert all((p.category is not None) == p.safety for p in pairs)
    assert {p.family for p in safety} == {"value_flip", "negation", "permission"}


def test_lexical_items_are_recorded_for_split_auditing():
    for pair in generate_core() + generate_role_binding():
        assert {"frame", "operator", "op_a", "op_b"} <= pair.lexical.keys()
    rb = generate_role_binding()[0]
    assert rb.lexical["agent_verb"] == "helped"
    assert rb.lexical["names"] == f"{rb.t_pos.strip()}/{rb.t_neg.strip()}"


def test_save_then_load_round_trips(tmp_path):
    pairs = generate_core()[:5] + generate_role_binding()[-3:]
    path = save_pairs(pairs, tmp_path / "sub" / "pairs.jsonl")
    assert load_pairs(path) == pairs
    assert load_pairs(str(path)) == pairs


def test_missing_field_error_names_file_line_and_field(tmp_path):
    bad = _record(id="p2")
    del bad["t_neg"]
    path = _write_jsonl(tmp_path / "pairs.jsonl", [_record(), bad])
    with pytest.raises(StimulusError, match=r"pairs\.jsonl:2 \(id 'p2'\): missing required field 't_neg'"):
        load_pairs(path)


def test_ill_typed_field_error_names_the_field(tmp_path):
    path = _write_jsonl(tmp_path / "pairs.jsonl", [_record(safety="yes")])
    with pytest.raises(StimulusError, match=r"pairs\.jsonl:1.*'safety' must be a bool"):
        load_pairs(path)


def test_empty_file_says_it_contains_no_pairs(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(StimulusError, match=r"empty\.jsonl contains no pairs"):
        load_pairs(path)


def test_nonexistent_path_is_named_and_builtins_listed(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl.*does not exist.*core, role_binding"):
        load_pairs(missing)


def test_invalid_json_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(_record()) + "\n\n{not json\n", encoding="utf-8")
    with pytest.raises(StimulusError, match=r"broken\.jsonl:3: invalid JSON"):
        load_pairs(path)


def test_non_object_line_is_rejected(tmp_path):
    path = _write_jsonl(tmp_path / "list.jsonl", [[1, 2]])
    with pytest.raises(StimulusError, match=r"list\.jsonl:1: expected a JSON object"):
        load_pairs(path)


def test_duplicate_ids_are_rejected(tmp_path):
    path = _write_jsonl(tmp_path / "dup.jsonl", [_record(), _record()])
    with pytest.raises(StimulusError, match=r"dup\.jsonl:2: duplicate id 'p1' \(first used on line 1\)"):
        load_pairs(path)


def test_missing_id_is_derived_from_family_and_line(tmp_path):
    first, second = _record(), _record()
    del first["id"], second["id"]
    path = tmp_path / "noid.jsonl"
    path.write_text(json.dumps(first) + "\n\n" + json.dumps(second) + "\n", encoding="utf-8")
    assert [p.id for p in load_pairs(path)] == ["value_flip-1", "value_flip-3"]


def test_optional_fields_default_when_absent():
    record = _record()
    del record["category"]
    pair = MinimalPair.from_dict(record)
    assert pair.lexical == {} and pair.category is None
    assert MinimalPair.from_dict(pair.to_dict()) == pair


def test_from_dict_without_id_or_line_is_an_error():
    record = _record()
    del record["id"]
    with pytest.raises(StimulusError, match="missing field 'id'"):
        MinimalPair.from_dict(record, where="my-record")


@pytest.mark.integration
def test_builtin_candidates_are_single_tokens_for_smollm2(smollm2_tokenizer):
    for name in BUILTIN_SETS:
        pairs = load_pairs(name)
        ids = audit_single_token(pairs, smollm2_tokenizer)
        assert list(ids) == [p.id for p in pairs]
        assert all(pos != neg for pos, neg in ids.values())


@pytest.mark.integration
def test_audit_reports_every_multi_token_candidate_in_one_error(smollm2_tokenizer):
    good = MinimalPair.from_dict(_record(id="ok"))
    bad_pos = MinimalPair.from_dict(_record(id="bad-pos", t_pos=" hippopotamus"))
    bad_neg = MinimalPair.from_dict(_record(id="bad-neg", t_neg=" rhinoceroses"))
    with pytest.raises(StimulusError) as info:
        audit_single_token([good, bad_pos, bad_neg], smollm2_tokenizer)
    message = str(info.value)
    assert "2 candidate problem(s)" in message
    assert "bad-pos: t_pos ' hippopotamus' is 3 tokens [' hipp', 'opotam', 'us']" in message
    assert "bad-neg: t_neg ' rhinoceroses'" in message
    assert "ok:" not in message
    assert "single-token candidates" in message and "remove these items" in message


@pytest.mark.integration
def test_audit_rejects_identical_candidates(smollm2_tokenizer):
    same = MinimalPair.from_dict(_record(id="same", t_neg=" Yes"))
    with pytest.raises(StimulusError, match="same: t_pos and t_neg are the same token"):
        audit_single_token([same], smollm2_tokenizer)


@pytest.mark.integration
def test_candidate_token_ids_follow_pair_order(smollm2_tokenizer):
    pairs = generate_role_binding()[:3]
    pos, neg = candidate_token_ids(pairs, smollm2_tokenizer)
    expected_pos = [smollm2_tokenizer.encode(p.t_pos, add_special_tokens=False)[0] for p in pairs]
    expected_neg = [smollm2_tokenizer.encode(p.t_neg, add_special_tokens=False)[0] for p in pairs]
    assert (pos, neg) == (expected_pos, expected_neg)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"ctx_b": _record()["ctx_a"]}, r"\(id 'p1'\): ctx_a and ctx_b are identical \("),
        ({"ctx_b": _record()["ctx_a"] + "  "}, "identical up to whitespace"),
        ({"ctx_a": ""}, "field 'ctx_a' is empty"),
        ({"ctx_b": "   "}, "field 'ctx_b' is whitespace only"),
        ({"family": ""}, "field 'family' is empty"),
        ({"id": ""}, r"pairs\.jsonl:1: field 'id' is empty"),
        ({"id": "  "}, r"pairs\.jsonl:1: field 'id' is whitespace only"),
        ({"t_pos": ""}, "field 't_pos' is empty"),
        ({"catgory": "law"}, "unknown field 'catgory'; a pair has only id, ctx_a"),
        ({"lexical": []}, "field 'lexical' must map strings to strings, got \\[\\]"),
    ],
)
def test_values_that_make_no_pair_are_rejected_with_file_line_id_and_field(tmp_path, changes, message):
    path = _write_jsonl(tmp_path / "pairs.jsonl", [_record(**changes)])
    with pytest.raises(StimulusError, match=message) as info:
        load_pairs(path)
    assert str(info.value).startswith(f"{path}:1") and "\n" not in str(info.value)


def test_a_long_value_is_shown_cut_in_the_message(tmp_path):
    path = _write_jsonl(tmp_path / "pairs.jsonl", [_record(ctx_a="x " * 500, ctx_b="x " * 500)])
    with pytest.raises(StimulusError, match=r"identical \('x x x .*\.\.\.\)") as info:
        load_pairs(path)
    assert len(str(info.value)) < 300


def test_pairs_built_in_python_are_validated_too():
    with pytest.raises(StimulusError, match=r"pair \(id 'x'\): ctx_a and ctx_b are identical"):
        MinimalPair("x", "a b", "a b", " Yes", " No", "f", False)
    with pytest.raises(StimulusError, match=r"pair \(id ''\): field 'id' is empty"):
        MinimalPair("", "a", "b", " Yes", " No", "f", False)
    with pytest.raises(StimulusError, match="field 'safety' must be a bool, got int"):
        MinimalPair("x", "a", "b", " Yes", " No", "f", 1)  # type: ignore[arg-type]


def test_non_utf8_bytes_are_named_by_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(
        json.dumps(_record()).encode()
        + b"\n"
        + json.dumps(_record(id="p2", ctx_a="caf\u00e9")).encode("latin-1").replace(b"\\u00e9", b"\xe9")
        + b"\n"
    )
    with pytest.raises(StimulusError, match=r"latin1\.jsonl:2: not valid UTF-8 \(byte 0xe9 at byte \d+ of the line\)"):
        load_pairs(path)


def test_bom_crlf_and_cr_line_endings_load(tmp_path):
    lines = [json.dumps(_record(id=f"p{i}")) for i in range(3)]
    path = tmp_path / "windows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + lines[0].encode() + b"\r\n" + lines[1].encode() + b"\r" + lines[2].encode())
    assert [p.id for p in load_pairs(path)] == ["p0", "p1", "p2"]


def test_a_key_given_twice_and_a_lone_surrogate_are_named(tmp_path):
    path = tmp_path / "dup.jsonl"
    path.write_text('{"id": "p1", "family": "a", "family": "b"}\n', encoding="utf-8")
    with pytest.raises(StimulusError, match=r"dup\.jsonl:1: field 'family' appears twice"):
        load_pairs(path)
    path.write_text(json.dumps(_record(ctx_a="bad \ud800 text")) + "\n", encoding="utf-8")
    with pytest.raises(StimulusError, match=r"\(id 'p1'\): field 'ctx_a' is not valid Unicode \(unpaired surrogate"):
        load_pairs(path)
