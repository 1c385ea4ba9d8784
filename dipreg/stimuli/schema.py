"""The minimal-pair record, its JSON form and the stimulus error type."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Self

__all__ = ["ALLOWED_FIELDS", "REQUIRED_FIELDS", "SAFETY_CATEGORIES", "MinimalPair", "StimulusError"]

#: Fields a stimulus record must carry (``id``, ``lexical`` and ``category`` are optional).
REQUIRED_FIELDS: tuple[str, ...] = ("ctx_a", "ctx_b", "t_pos", "t_neg", "family", "safety")

#: Every field a stimulus record may carry; any other key is an error (a misspelt optional field would
#: otherwise be dropped without a word).
ALLOWED_FIELDS: tuple[str, ...] = ("id", *REQUIRED_FIELDS, "lexical", "category")

#: Safety categories used by the built-in sets (user files may use other labels).
SAFETY_CATEGORIES: tuple[str, ...] = ("harm", "law", "deception", "security", "trust")

#: Longest value shown in an error message (longer ones are cut with ``...``).
_SHOW_CHARS = 60


class StimulusError(ValueError):
    """A stimulus set or record is unusable; the message names the item and says what to do."""


def _show(value: object) -> str:
    """A short, one-line ``repr`` of ``value`` for an error message (never raises)."""
    try:
        text = repr(value)
    except Exception:  # e.g. an int too long to print: describe it instead
        return f"<{type(value).__name__} that cannot be shown>"
    return text if len(text) <= _SHOW_CHARS else text[: _SHOW_CHARS - 3] + "..."


def _encoding_problem(key: str, value: str) -> str | None:
    """A message when ``value`` cannot be written as UTF-8 (a lone surrogate from a ``\\ud800`` escape)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        return (
            f"field {key!r} is not valid Unicode (unpaired surrogate {_show(value[err.start])} at character "
            f"{err.start}). Fix the \\u escape."
        )
    return None


def _text_problem(key: str, value: object, *, blank_ok: bool) -> str | None:
    """What is wrong with the text field ``key`` (type, emptiness or encoding), or ``None``.

    ``blank_ok`` allows whitespace-only text (candidates such as ``" "``); empty text is always refused.
    """
    if not isinstance(value, str):
        return f"field {key!r} must be a str, got {type(value).__name__} ({_show(value)}). Fix the value."
    if not value or (not blank_ok and not value.strip()):
        kind = "empty" if not value else "whitespace only"
        return f"field {key!r} is {kind} ({_show(value)}). Write the text of the field."
    return _encoding_problem(key, value)


def _content_problem(
    pair_id: object, ctx_a: object, ctx_b: object, t_pos: object, t_neg: object, family: object, safety: object
) -> str | None:
    """The first problem with the values of a pair's fields (types, blanks, identical contexts), or ``None``."""
    texts = {"id": pair_id, "ctx_a": ctx_a, "ctx_b": ctx_b, "family": family}
    for key, value in texts.items():
        problem = _text_problem(key, value, blank_ok=False)
        if problem:
            return problem
    for key, value in (("t_pos", t_pos), ("t_neg", t_neg)):
        problem = _text_problem(key, value, blank_ok=True)
        if problem:
            return problem
    if not isinstance(safety, bool):
        return f"field 'safety' must be a bool, got {type(safety).__name__} ({_show(safety)}). Fix the value."
    if isinstance(ctx_a, str) and isinstance(ctx_b, str) and " ".join(ctx_a.split()) == " ".join(ctx_b.split()):
        same = "identical" if ctx_a == ctx_b else "identical up to whitespace"
        return (
            f"ctx_a and ctx_b are {same} ({_show(ctx_a)}): a minimal pair must differ in its polarity operator. "
            "Fix one context or remove the item."
        )
    return None


@dataclass(frozen=True)
class MinimalPair:
    """Two contexts that differ only in a polarity operator, with two one-token candidate answers.

    In ``ctx_a`` the correct answer is ``t_pos``; in ``ctx_b`` it is ``t_neg``. Candidates include their
    leading space (``" Yes"``). ``lexical`` records the items the pair was built from (act, operator,
    frame, names ...) so that train/test splits can be audited for lexical overlap; ``category`` is the
    safety category (harm/law/deception/security/trust) or ``None``.

    Construction validates the values: ``id``, ``family`` and both contexts are non-blank strings, the
    candidates are non-empty strings, ``safety`` is a bool and the contexts differ (beyond whitespace);
    otherwise :class:`StimulusError` names the item and the field.
    """

    id: str
    ctx_a: str
    ctx_b: str
    t_pos: str
    t_neg: str
    family: str
    safety: bool
    lexical: dict[str, str] = field(default_factory=dict, hash=False)
    category: str | None = None

    def __post_init__(self) -> None:
        problem = _content_problem(self.id, self.ctx_a, self.ctx_b, self.t_pos, self.t_neg, self.family, self.safety)
        if problem:
            raise StimulusError(f"pair (id {_show(self.id)}): {problem}")

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict with every field (``lexical`` copied)."""
        return {
            "id": self.id,
            "ctx_a": self.ctx_a,
            "ctx_b": self.ctx_b,
            "t_pos": self.t_pos,
            "t_neg": self.t_neg,
            "family": self.family,
            "safety": self.safety,
            "lexical": dict(self.lexical),
            "category": self.category,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "record", line_no: int | None = None) -> Self:
        """Build a pair from a JSON object, validating field presence, types and values.

        ``where`` names the record in error messages (e.g. ``"pairs.jsonl:12"``). When ``id`` is absent it
        is derived as ``f"{family}-{line_no}"``; without ``line_no`` a missing ``id`` is an error. A key
        outside :data:`ALLOWED_FIELDS` is an error (it would otherwise be ignored).
        Raises :class:`StimulusError` naming the record, its id when known, and the offending field.
        """
        if not isinstance(d, Mapping):
            raise StimulusError(
                f"{where}: expected a JSON object with fields {', '.join(REQUIRED_FIELDS)}, "
                f"got {type(d).__name__} ({_show(d)}). Write one JSON object per pair."
            )
        pair_id = d.get("id")
        name = f"{where} (id {_show(pair_id)})" if isinstance(pair_id, str) and pair_id.strip() else where
        unknown = [key for key in d if key not in ALLOWED_FIELDS]
        if unknown:
            raise StimulusError(
                f"{name}: unknown field {_show(unknown[0])}; a pair has only {', '.join(ALLOWED_FIELDS)}. "
                "Rename or remove it."
            )
        for key in REQUIRED_FIELDS:
            if key not in d:
                needed = ", ".join(REQUIRED_FIELDS)
                raise StimulusError(f"{name}: missing required field {key!r}; add it (required: {needed}).")
        if "id" not in d:
            if line_no is None:
                raise StimulusError(f"{where}: missing field 'id'. Give the pair a unique string id.")
            problem = _text_problem("family", d["family"], blank_ok=False)
            pair_id = f"{d['family']}-{line_no}" if problem is None else "?"
        problem = _content_problem(pair_id, d["ctx_a"], d["ctx_b"], d["t_pos"], d["t_neg"], d["family"], d["safety"])
        if problem:
            raise StimulusError(f"{name}: {problem}")
        lexical = d.get("lexical")
        lexical = {} if lexical is None else lexical
        if not isinstance(lexical, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in lexical.items()
        ):
            raise StimulusError(
                f"{name}: field 'lexical' must map strings to strings, got {_show(lexical)}. Fix or remove it."
            )
        for key, value in lexical.items():
            problem = _encoding_problem(f"lexical.{key}", value) or _encoding_problem("lexical", key)
            if problem:
                raise StimulusError(f"{name}: {problem}")
        category = d.get("category")
        if category is not None and not isinstance(category, str):
            raise StimulusError(f"{name}: field 'category' must be a string or null, got {_show(category)}.")
        problem = _encoding_problem("category", category) if category is not None else None
        if problem:
            raise StimulusError(f"{name}: {problem}")
        return cls(
            id=pair_id,
            ctx_a=d["ctx_a"],
            ctx_b=d["ctx_b"],
            t_pos=d["t_pos"],
            t_neg=d["t_neg"],
            family=d["family"],
            safety=d["safety"],
            lexical=dict(lexical),
            category=category,
        )
