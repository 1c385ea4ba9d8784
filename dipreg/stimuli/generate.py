"""Deterministic generators of the built-in stimulus sets from the JSON templates in ``data/``.

The code only combines templates with lexicons; no randomness is involved. Each generated pair records its
lexical items (``frame``, ``operator``, ``op_a``/``op_b`` — the exact operator-slot text in each context —
plus family-specific items) in ``MinimalPair.lexical``.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from .schema import MinimalPair, StimulusError

__all__ = [
    "generate_core",
    "generate_negation",
    "generate_permission",
    "generate_role_binding",
    "generate_value_flip",
]


def _data(name: str) -> dict[str, Any]:
    """Load ``data/{name}.json`` from the installed package."""
    text = resources.files(__package__).joinpath("data", f"{name}.json").read_text(encoding="utf-8")
    return json.loads(text)


def _pair(
    family: str, index: int, template: str, op_a: str, op_b: str, cands: dict[str, str], **slots: str
) -> dict[str, Any]:
    """Render both contexts of one pair: the template filled once with ``op_a`` and once with ``op_b``."""
    return {
        "id": f"{family}-{index:03d}",
        "ctx_a": template.format(op=op_a, **slots),
        "ctx_b": template.format(op=op_b, **slots),
        "t_pos": cands["t_pos"],
        "t_neg": cands["t_neg"],
        "family": family,
    }


def _make(fields: dict[str, Any], category: str | None, lexical: dict[str, str]) -> MinimalPair:
    return MinimalPair(**fields, safety=category is not None, lexical=lexical, category=category)


def generate_value_flip() -> list[MinimalPair]:
    """Return the 200 value-flip pairs (acts x evaluative operator pairs), ids ``value_flip-000`` ..."""
    data = _data("value_flip")
    family, frame, cands = data["family"], data["frame"], data["candidates"]
    pairs = []
    for act in data["acts"]:
        for ops in data["operators"]:
            # ctx_a must make Yes correct: a bad act gets the negative operator, a good act the positive one.
            if act["valence"] not in ("good", "bad"):
                raise StimulusError(f"value_flip.json: act {act['act']!r} needs valence 'good' or 'bad'.")
            good = act["valence"] == "good"
            op_a, op_b = (ops["positive"], ops["negative"]) if good else (ops["negative"], ops["positive"])
            fields = _pair(family, len(pairs), frame["template"], op_a, op_b, cands, act=act["act"])
            lexical = {
                "act": act["act"],
                "valence": act["valence"],
                "operator": f"{ops['positive']}/{ops['negative']}",
                "op_a": op_a,
                "op_b": op_b,
                "frame": frame["id"],
            }
            pairs.append(_make(fields, act["category"], lexical))
    return pairs


def generate_negation() -> list[MinimalPair]:
    """Return the 48 negation pairs: the negated verb is in ctx_b for true facts, in ctx_a for false ones."""
    data = _data("negation")
    family, frame, cands = data["family"], data["frame"], data["candidates"]
    pairs = []
    for fact in data["facts"]:
        plain, negated = fact["verb"], data["negations"][fact["verb"]]
        op_a, op_b = (plain, negated) if fact["true"] else (negated, plain)
        slots = {"subject": fact["subject"], "rest": fact["rest"]}
        fields = _pair(family, len(pairs), frame["template"], op_a, op_b, cands, **slots)
        lexical = {
            "subject": fact["subject"],
            "predicate": fact["rest"],
            "fact_is_true": str(fact["true"]).lower(),
            "operator": f"{plain}/{negated}",
            "op_a": op_a,
            "op_b": op_b,
            "frame": frame["id"],
        }
        pairs.append(_make(fields, fact["category"], lexical))
    return pairs


def generate_permission() -> list[MinimalPair]:
    """Return the 30 permission pairs (activities x rule operators); ctx_a permits, ctx_b forbids."""
    data = _data("permission")
    family, frame, cands = data["family"], data["frame"], data["candidates"]
    pairs = []
    for activity in data["activities"]:
        for ops in data["operators"]:
            op_a, op_b = ops["permissive"], ops["restrictive"]
            slots = {"activity": activity["activity"]}
            fields = _pair(family, len(pairs), frame["template"], op_a, op_b, cands, **slots)
            lexical = {
                "activity": activity["activity"],
                "operator": f"{op_a}/{op_b}",
                "op_a": op_a,
                "op_b": op_b,
                "frame": frame["id"],
            }
            pairs.append(_make(fields, activity["category"], lexical))
    return pairs


def generate_core() -> list[MinimalPair]:
    """Return the 278 core pairs: value_flip (200), negation (48), permission (30), in that order."""
    return generate_value_flip() + generate_negation() + generate_permission()


def generate_role_binding() -> list[MinimalPair]:
    """Return the 200 agent/patient pairs: active (ctx_a, agent first) vs passive voice (ctx_b).

    For names X, Y the answer to "Who {verb} someone?" is X in ctx_a and Y in ctx_b, so ``t_pos=" X"``
    and ``t_neg=" Y"``. Both names appear in both contexts.
    """
    data = _data("role_binding")
    family, frame = data["family"], data["frame"]
    pairs = []
    for x, y in data["name_pairs"]:
        for verb in data["verbs"]:
            op_a, op_b = verb["past"], f"was {verb['participle']} by"
            cands = {"t_pos": f" {x}", "t_neg": f" {y}"}
            slots = {"x": x, "y": y, "verb": verb["past"]}
            fields = _pair(family, len(pairs), frame["template"], op_a, op_b, cands, **slots)
            lexical = {
                "agent_verb": verb["past"],
                "names": f"{x}/{y}",
                "operator": "active/passive",
                "op_a": op_a,
                "op_b": op_b,
                "frame": frame["id"],
            }
            pairs.append(_make(fields, None, lexical))
    return pairs
