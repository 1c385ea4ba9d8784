"""Rule-based A/B extraction on fixed strings."""

import pytest

from dipreg.eval.readouts.extraction import extract_choice, extract_letter

ROLES = ("the nurse", "the patient")
ROLE_KEYS = (("nurse",), ("patient",))
VALUES = ("it was acceptable", "it was unacceptable")
VALUE_KEYS = (("acceptable",), ("unacceptable",))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B", 1),
        ("(A)", 0),
        ("A) the nurse", 0),
        ("B. Because the patient did it.", 1),
        ("The answer is B.", 1),
        ("Option A is correct", 0),
        ("Answer: (B)", 1),
        ("I pick (A) here", 0),
        ("A good question.", None),  # the article is not a vote
        ("a", None),
        ("", None),
    ],
)
def test_letters(text, expected):
    assert extract_letter(text) == expected


@pytest.mark.parametrize(
    ("text", "free", "extractive"),
    [
        ("B) the patient", 1, 1),
        ("the nurse", 0, 0),
        ("The Nurse.", 0, 0),
        ("It was the patient who helped.", 1, 1),
        ("The nurse helped the patient.", None, 0),  # names both: undecided when free, first span when extractive
        ("The patient was helped by the nurse, so the answer is A.", 0, 1),  # free: the explicit letter wins
        ("Nobody helped anyone.", None, None),
        ("The nurses", None, None),  # whole words only
    ],
)
def test_role_options(text, free, extractive):
    assert extract_choice(text, ROLES, ROLE_KEYS, "free") == free
    assert extract_choice(text, ROLES, ROLE_KEYS, "extractive") == extractive


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("It was unacceptable.", 1),
        ("it was acceptable", 0),
        ("Her behavior was unacceptable because she lied.", 1),  # key word, not the whole phrase
        ("That is acceptable, not unacceptable.", None),
    ],
)
def test_keys_match_whole_words(text, expected):
    assert extract_choice(text, VALUES, VALUE_KEYS, "free") == expected


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="extraction mode"):
        extract_choice("A", ROLES, ROLE_KEYS, "fuzzy")  # type: ignore[arg-type]
