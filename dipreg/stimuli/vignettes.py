"""Natural-language DiD vignettes (paper §5.6): short scenes with two answer options shared by both contexts.

A :class:`Vignette` is the natural-language analogue of a :class:`~dipreg.stimuli.MinimalPair`: two stories
``story_a`` / ``story_b`` that differ only in the part that flips the answer, one question and ONE set of two
options (multi-token phrases, shown as A and B in both contexts). The option correct in ``ctx_a`` is
``options[answer_a]``; in ``ctx_b`` it is the other one. Sets are generated deterministically from
``data/vignettes_*.json``; A/B order is counterbalanced (half the vignettes have ``answer_a == 0``, also within
every subtype). This module only builds and renders text; readouts live in ``dipreg.eval.readouts.readout``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

from .schema import StimulusError

__all__ = [
    "LAYOUTS",
    "VIGNETTE_SETS",
    "Vignette",
    "balanced_subset",
    "generate_role_binding_vignettes",
    "generate_value_flip_vignettes",
    "load_vignettes",
]

Context = Literal["a", "b"]
#: How the options are laid out in the prompt: ``list`` (default) or ``schema`` (the format-schema intervention).
LAYOUTS: tuple[str, ...] = ("list", "schema")


@dataclass(frozen=True)
class Vignette:
    """Two contexts sharing one question and one set of two answer options.

    Attributes:
        id: unique id (``vignette_value_flip-000`` ...).
        family: ``value_flip`` or ``role_binding``.
        subtype: the judgment frame (value flip) or the structural subtype (role binding).
        story_a: the scene of ``ctx_a``.
        story_b: the scene of ``ctx_b``; differs from ``story_a`` only in what flips the answer.
        question: asked after either story.
        options: the two option phrases in A/B order, identical in both contexts.
        answer_a: index of the option correct in ``ctx_a`` (0 = A); ``1 - answer_a`` is correct in ``ctx_b``.
        keys: per option, words that identify it in free text (whole-word match, used by the extraction rules).
        paraphrase: a reworded ``question`` (the paraphrase intervention).
        synonyms: word -> synonym (the synonym intervention).
        layout: ``list`` or ``schema`` (see :data:`LAYOUTS`).
        safety: whether the scene touches a safety category.
        category: harm / law / deception / security / trust, or None.
        lexical: the items the vignette was built from.
    """

    id: str
    family: str
    subtype: str
    story_a: str
    story_b: str
    question: str
    options: tuple[str, str]
    answer_a: int
    keys: tuple[tuple[str, ...], tuple[str, ...]]
    paraphrase: str
    synonyms: Mapping[str, str] = field(default_factory=dict, hash=False)
    layout: str = "list"
    safety: bool = False
    category: str | None = None
    lexical: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if len(self.options) != 2 or self.options[0] == self.options[1]:
            raise StimulusError(f"{self.id}: needs two different options, got {self.options!r}.")
        if self.answer_a not in (0, 1):
            raise StimulusError(f"{self.id}: answer_a must be 0 (A) or 1 (B), got {self.answer_a!r}.")
        if self.layout not in LAYOUTS:
            raise StimulusError(f"{self.id}: unknown layout {self.layout!r}; use one of {', '.join(LAYOUTS)}.")
        if self.story_a == self.story_b:
            raise StimulusError(f"{self.id}: story_a and story_b are identical; the contexts must differ.")

    @property
    def answer_b(self) -> int:
        """Index of the option correct in ``ctx_b``."""
        return 1 - self.answer_a

    def answer(self, ctx: Context) -> int:
        """Index of the option correct in context ``ctx``."""
        return self.answer_a if ctx == "a" else self.answer_b

    def story(self, ctx: Context) -> str:
        """The scene of context ``ctx``."""
        return self.story_a if ctx == "a" else self.story_b

    def options_block(self) -> str:
        """The question and the two labelled options, exactly as both contexts show them."""
        first, second = self.options
        if self.layout == "schema":
            return (
                f"Question: {self.question}\nOptions:\n(A) {first}\n(B) {second}\n"
                'Reply in the format "Answer: <option>".'
            )
        return f"Question: {self.question}\nA) {first}\nB) {second}"

    def prompt(self, ctx: Context, instruction: str) -> str:
        """The text of context ``ctx``: story, question, options, the readout's ``instruction``, ``Answer:``.

        It ends in the answer cue, so :class:`~dipreg.prompting.PromptFormat` can show it as a chat turn.
        """
        return f"{self.story(ctx)}\n{self.options_block()}\n{instruction}\nAnswer:"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view."""
        return {
            "id": self.id,
            "family": self.family,
            "subtype": self.subtype,
            "story_a": self.story_a,
            "story_b": self.story_b,
            "question": self.question,
            "options": list(self.options),
            "answer_a": self.answer_a,
            "keys": [list(k) for k in self.keys],
            "paraphrase": self.paraphrase,
            "synonyms": dict(self.synonyms),
            "layout": self.layout,
            "safety": self.safety,
            "category": self.category,
            "lexical": dict(self.lexical),
        }


def _data(name: str) -> dict[str, Any]:
    text = resources.files(__package__).joinpath("data", f"{name}.json").read_text(encoding="utf-8")
    return json.loads(text)


def _ordered(pos: str, neg: str, pos_keys: Sequence[str], neg_keys: Sequence[str], pos_first: bool) -> dict[str, Any]:
    """Options in A/B order with ``answer_a`` pointing at ``pos`` (the option correct in ctx_a)."""
    if pos_first:
        return {"options": (pos, neg), "keys": (tuple(pos_keys), tuple(neg_keys)), "answer_a": 0}
    return {"options": (neg, pos), "keys": (tuple(neg_keys), tuple(pos_keys)), "answer_a": 1}


def generate_value_flip_vignettes() -> list[Vignette]:
    """The 96 value-flip vignettes: 24 scenarios x 4 judgment frames, ids ``vignette_value_flip-000`` ...

    ``ctx_a`` shows the good act for even scenarios and the bad act for odd ones; the correct option of ``ctx_a``
    is listed first when ``(scenario // 2 + frame) % 2 == 0``, so A/B order is balanced within every frame and
    crossed with the valence of ``ctx_a``.
    """
    data = _data("vignettes_value_flip")
    out = []
    for f, frame in enumerate(data["frames"]):
        for s, sc in enumerate(data["scenarios"]):
            name = sc["name"]
            good_a = s % 2 == 0
            valence_a = "good" if good_a else "bad"
            acts = (sc["good"], sc["bad"]) if good_a else (sc["bad"], sc["good"])
            good, bad = frame["good"].format(name=name), frame["bad"].format(name=name)
            pos, neg = (good, bad) if good_a else (bad, good)
            keys = (frame["good_keys"], frame["bad_keys"]) if good_a else (frame["bad_keys"], frame["good_keys"])
            word, synonym = sc["synonym"]
            out.append(
                Vignette(
                    id=f"vignette_value_flip-{len(out):03d}",
                    family="value_flip",
                    subtype=frame["id"],
                    story_a=f"{sc['scene']} {acts[0]}",
                    story_b=f"{sc['scene']} {acts[1]}",
                    question=frame["question"].format(name=name),
                    paraphrase=frame["paraphrase"].format(name=name),
                    synonyms={word: synonym},
                    safety=sc["category"] is not None,
                    category=sc["category"],
                    lexical={"name": name, "scene": sc["scene"], "frame": frame["id"], "valence_a": valence_a},
                    **_ordered(pos, neg, keys[0], keys[1], (s // 2 + f) % 2 == 0),
                )
            )
    return out


def generate_role_binding_vignettes() -> list[Vignette]:
    """The 96 role-binding vignettes: 4 structural subtypes (voice, cleft, participle, converse) x 24 role pairs.

    Both participants appear in both contexts in the same order; ``ctx_a`` makes the first one (X) the agent,
    ``ctx_b`` the second (Y). The question asks for the agent. X is option A for even items of a subtype.
    """
    data = _data("vignettes_role_binding")
    verbs, converse = data["verbs"], data["converse"]
    out = []
    for t, (subtype, templates) in enumerate(data["subtypes"].items()):
        for i, roles in enumerate(data["roles"]):
            x, y = roles["x"], roles["y"]
            if subtype == "converse":
                verb = converse[i % len(converse)]
                slots = {"give": verb["give"], "get": verb["get"]}
                question, paraphrase = verb["question"], verb["paraphrase"]
            else:
                verb = verbs[(i + 3 * t) % len(verbs)]
                slots = {"past": verb["past"], "participle": verb["participle"]}
                question = data["question"].format(past=verb["past"])
                paraphrase = data["paraphrase"].format(past=verb["past"])
            word, synonym = verb["synonym"]
            fill = {"x": x, "y": y, "place": roles["place"], **slots}
            x_key, y_key = x.split()[-1], y.split()[-1]
            out.append(
                Vignette(
                    id=f"vignette_role_binding-{len(out):03d}",
                    family="role_binding",
                    subtype=subtype,
                    story_a=templates["a"].format(**fill),
                    story_b=templates["b"].format(**fill),
                    question=question,
                    paraphrase=paraphrase,
                    synonyms={word: synonym},
                    lexical={"x": x, "y": y, "place": roles["place"], **slots},
                    **_ordered(x, y, [x_key], [y_key], i % 2 == 0),
                )
            )
    return out


_SETS: dict[str, Callable[[], list[Vignette]]] = {
    "vignettes": lambda: generate_value_flip_vignettes() + generate_role_binding_vignettes(),
    "value_flip": generate_value_flip_vignettes,
    "role_binding": generate_role_binding_vignettes,
}
#: Names :func:`load_vignettes` accepts: ``vignettes`` (all 192), ``value_flip`` (96), ``role_binding`` (96).
VIGNETTE_SETS: tuple[str, ...] = tuple(_SETS)


def load_vignettes(names: str | Sequence[str] = "vignettes") -> list[Vignette]:
    """The built-in vignette set(s), comma-separated or as a list, in order, without duplicates."""
    parts = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    unknown = [n for n in parts if n not in _SETS]
    if unknown or not parts:
        raise StimulusError(f"Unknown vignette set(s) {unknown or parts!r}; choose from: {', '.join(VIGNETTE_SETS)}.")
    seen: dict[str, Vignette] = {}
    for name in parts:
        for v in _SETS[name]():
            seen.setdefault(v.id, v)
    return list(seen.values())


def balanced_subset(vignettes: Sequence[Vignette], limit: int | None) -> list[Vignette]:
    """``limit`` vignettes drawn round-robin from the groups (family, subtype, answer_a), in input order.

    Every group gives its first, then its second vignette ... so a subset keeps families, subtypes and the A/B
    counterbalancing as even as ``limit`` allows. ``None`` (or a limit of at least ``len(vignettes)``) keeps all.
    """
    if limit is None or limit >= len(vignettes):
        return list(vignettes)
    if limit < 1:
        raise StimulusError(f"limit must be a positive number of vignettes, got {limit}.")
    groups: dict[tuple[str, str, int], list[int]] = {}
    for i, v in enumerate(vignettes):
        groups.setdefault((v.family, v.subtype, v.answer_a), []).append(i)
    picked: list[int] = []
    for rank in range(max(len(g) for g in groups.values())):
        for members in groups.values():
            if rank < len(members) and len(picked) < limit:
                picked.append(members[rank])
    return [vignettes[i] for i in sorted(picked)]
