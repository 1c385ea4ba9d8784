"""Rule-based extraction of an A/B decision from generated text (pure string functions, no model).

Two modes, one per generative readout:

- ``"free"`` (free generation): an explicit letter first ("B", "(A)", "A) ...", "the answer is B", "Option A"),
  then the option phrase, then the option's key words; a phrase or key counts only when exactly ONE option is
  mentioned (an explanation that names both is undecided).
- ``"extractive"`` (extractive answering): the option phrase that starts earliest, then the earliest key word,
  then an explicit letter (the answer is the span the model copied first).

Matching is case-insensitive and on whole words; ``None`` means no decision (counted as wrong, never dropped).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

ExtractionMode = Literal["free", "extractive"]
EXTRACTION_MODES: tuple[str, ...] = ("free", "extractive")

#: Explicit letter patterns, tried in order; the letter itself must be upper case (so the article "a" is no vote).
LETTER_PATTERNS: tuple[re.Pattern[str], ...] = (
    re.compile(r"^\W*\(?([AB])(?:\)|\.|:|,|;|\s*$)"),  # "B", "(A)", "A) it was", "B." at the start
    re.compile(r"\b(?i:answer|option|choice)\b\s*(?i:is|would be|:|=)?\s*\(?([AB])\b"),  # "the answer is B"
    re.compile(r"\(([AB])\)"),  # "(A)" anywhere
)


def extract_letter(text: str) -> int | None:
    """0 for A, 1 for B from the first letter pattern that matches; None when none does."""
    for pattern in LETTER_PATTERNS:
        match = pattern.search(text)
        if match:
            return "AB".index(match.group(1))
    return None


def _first_index(text: str, phrases: Sequence[str]) -> int | None:
    """Start of the earliest whole-word, case-insensitive occurrence of any of ``phrases`` in ``text``."""
    starts = [
        m.start()
        for phrase in phrases
        if phrase.strip()
        for m in [re.search(rf"(?<!\w){re.escape(phrase.strip())}(?!\w)", text, flags=re.IGNORECASE)]
        if m
    ]
    return min(starts) if starts else None


def _pick(text: str, candidates: Sequence[Sequence[str]], mode: ExtractionMode) -> int | None:
    found = {i: at for i, phrases in enumerate(candidates) if (at := _first_index(text, phrases)) is not None}
    if len(found) == 1:
        return next(iter(found))
    if len(found) > 1 and mode == "extractive":
        return min(found, key=found.__getitem__)
    return None


def extract_choice(
    text: str, options: Sequence[str], keys: Sequence[Sequence[str]] = ((), ()), mode: ExtractionMode = "free"
) -> int | None:
    """The option (0 = A, 1 = B) that ``text`` chooses, or None.

    Args:
        text: the generated answer.
        options: the option phrases in A/B order.
        keys: per option, words that identify it (e.g. ``[["nurse"], ["patient"]]``).
        mode: ``"free"`` or ``"extractive"`` (see the module docstring for the rules).
    """
    if mode not in EXTRACTION_MODES:
        raise ValueError(f"Unknown extraction mode {mode!r}; choose one of: {', '.join(EXTRACTION_MODES)}.")
    letter = (lambda: extract_letter(text),)
    phrases = (lambda: _pick(text, [[o] for o in options], mode), lambda: _pick(text, keys, mode))
    steps = (*letter, *phrases) if mode == "free" else (*phrases, *letter)
    for step in steps:
        choice = step()
        if choice is not None:
            return choice
    return None
