"""The minimal-pair record, its JSON form and the stimulus error type."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Self

__all__ = ["REQUIRED_FIELDS", "SAFETY_CATEGORIES", "MinimalPair", "StimulusError"]

#: Fields a stimulus record must carry (``id``, ``lexical`` and ``category`` are optional).
REQUIRED_FIELDS: tuple[str, ...] = ("ctx_a", "ctx_b", "t_pos", "t_neg", "family", "safety")

#: Safety categories used by the built-in sets (user files may use other labels).
SAFETY_CATEGORIES: tuple[str, ...] = ("harm", "law", "deception", "security", "trust")


class StimulusError(ValueError):
    """A stimulus set or record is unusable; the message names the item and says what to do."""


@dataclass(frozen=True)
class MinimalPair:
    """Two contexts that differ only in a polarity operator, with two one-token candidate answers.

    In ``ctx_a`` the correct answer is ``t_pos``; in ``ctx_b`` it is ``t_neg``. Candidates include their
    leading space (``" Yes"``). ``lexical`` records the items the pair was built from (act, operator,
    frame, names ...) so that train/test splits can be audited for lexical overlap; ``category`` is the
    safety category (harm/law/deception/security/trust) or ``None``.
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
        """Build a pair from a JSON object, validating field presence and types.

        ``where`` names the record in error messages (e.g. ``"pairs.jsonl:12"``). When ``id`` is absent it
        is derived as ``f"{family}-{line_no}"``; without ``line_no`` a missing ``id`` is an error.
        Raises :class:`StimulusError` naming the record and the offending field.
        """
        if not isinstance(d, Mapping):
            raise StimulusError(
                f"{where}: expected a JSON object with fields {', '.join(REQUIRED_FIELDS)}, "
                f"got {type(d).__name__}. Write one JSON object per pair."
            )
        name = f"{where} (id {d['id']!r})" if isinstance(d.get("id"), str) else where
        for key in REQUIRED_FIELDS:
            if key not in d:
                needed = ", ".join(REQUIRED_FIELDS)
                raise StimulusError(f"{name}: missing required field {key!r}; add it (required: {needed}).")
            expected = bool if key == "safety" else str
            if not isinstance(d[key], expected):
                raise StimulusError(
                    f"{name}: field {key!r} must be a {expected.__name__}, got {type(d[key]).__name__} "
                    f"({d[key]!r}). Fix the value."
                )
        if "id" in d:
            pair_id = d["id"]
            if not isinstance(pair_id, str) or not pair_id:
                raise StimulusError(f"{where}: field 'id' must be a non-empty string, got {pair_id!r}.")
        elif line_no is not None:
            pair_id = f"{d['family']}-{line_no}"
        else:
            raise StimulusError(f"{where}: missing field 'id'. Give the pair a unique string id.")
        lexical = d.get("lexical") or {}
        if not isinstance(lexical, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in lexical.items()
        ):
            raise StimulusError(
                f"{name}: field 'lexical' must map strings to strings, got {lexical!r}. Fix or remove it."
            )
        category = d.get("category")
        if category is not None and not isinstance(category, str):
            raise StimulusError(f"{name}: field 'category' must be a string or null, got {category!r}.")
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
