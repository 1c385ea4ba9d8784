"""Compositional train / held-out splits of role-binding pairs (paper §6.1) and the 240-item strict set.

Everything comes from ``data/compositional.json``; the code only crosses verbs × frames × name pairs in a fixed
order (no randomness). Splits: ``train`` = train verbs × train frames; ``loose`` = held out in exactly one factor;
``strict`` = held-out verbs × held-out frames; ``strict240`` = entirely new verbs, frames and names. The lexical
audits run at generation and raise :class:`StimulusError` when a split leaks a held-out item.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import cache
from typing import Any

from .generate import _data
from .schema import MinimalPair, StimulusError

__all__ = ["COMPOSITIONAL_SETS", "audit_held_out", "audit_no_overlap", "generate_compositional"]

#: Set names served by :func:`generate_compositional` (and by ``load_pairs``).
COMPOSITIONAL_SETS: tuple[str, ...] = ("comp_train", "comp_loose", "comp_strict", "strict240")

#: ``MinimalPair.lexical`` keys that count as lexical items in the overlap audits.
LEXICAL_KEYS: tuple[str, ...] = ("verb", "participle", "frame", "template", "x", "y")


def _combos(verbs: Sequence[dict], frames: Sequence[dict]) -> list[tuple[dict, dict]]:
    return [(v, f) for v in verbs for f in frames]


def _build(
    split: str, combos: Sequence[tuple[dict, dict]], names: Sequence[Sequence[str]], size: int, data: dict[str, Any]
) -> list[MinimalPair]:
    """``size`` pairs, cycling name pairs over the verb × frame combos round by round (every combo is used
    before any is reused; combo ``c`` in round ``k`` gets name pair ``(c + k) mod n``)."""
    capacity = len(combos) * len(names)
    if size > capacity:
        raise StimulusError(
            f"compositional.json: split {split!r} asks for {size} pairs but its verbs × frames × names give only "
            f"{capacity}. Lower 'sizes.{split}' or add lexicon entries."
        )
    ops, pairs = data["operators"], []
    for k in range(-(-size // len(combos))):
        for c, (verb, frame) in enumerate(combos):
            if len(pairs) == size:
                break
            x, y = names[(c + k) % len(names)]
            op_a = ops["active"].format(**verb)
            op_b = ops["passive"].format(**verb)
            fill = {"x": x, "y": y, "verb": verb["past"]}
            lexical = {
                "verb": verb["past"],
                "participle": verb["participle"],
                "frame": frame["id"],
                "template": frame["template"],
                "x": x,
                "y": y,
                "operator": "active/passive",
                "op_a": op_a,
                "op_b": op_b,
            }
            pairs.append(
                MinimalPair(
                    id=f"{split}-{len(pairs):03d}",
                    ctx_a=frame["template"].format(op=op_a, **fill),
                    ctx_b=frame["template"].format(op=op_b, **fill),
                    t_pos=f" {x}",
                    t_neg=f" {y}",
                    family=data["family"],
                    safety=False,
                    lexical=lexical,
                )
            )
    return pairs


def _items(pairs: Iterable[MinimalPair], keys: Iterable[str]) -> dict[str, set[str]]:
    return {key: {p.lexical[key] for p in pairs if key in p.lexical} for key in keys}


def audit_no_overlap(train: Sequence[MinimalPair], test: Sequence[MinimalPair], keys: Sequence[str] = LEXICAL_KEYS):
    """Raise :class:`StimulusError` naming every lexical item (verb, frame, template, name) that ``test`` shares
    with ``train``. Names are compared across the ``x``/``y`` roles."""
    seen, new = _items(train, keys), _items(test, keys)
    name_keys = {"x", "y"}
    train_names = set().union(*(seen[k] for k in name_keys & set(keys)))
    shared = {
        key: sorted(new[key] & (train_names if key in name_keys else seen[key]))
        for key in keys
        if new[key] & (train_names if key in name_keys else seen[key])
    }
    if shared:
        detail = "; ".join(f"{key}: {', '.join(items)}" for key, items in shared.items())
        raise StimulusError(
            f"Lexical overlap with the training split ({detail}). Replace these items in compositional.json."
        )


def audit_held_out(train: Sequence[MinimalPair], split: Sequence[MinimalPair], name: str) -> None:
    """Check the held-out factors of ``split`` against ``train``: in ``strict`` every pair has an unseen verb
    AND an unseen frame; in ``loose`` exactly one of the two is unseen. Raises :class:`StimulusError`."""
    seen = _items(train, ("verb", "frame"))
    need = 2 if name == "strict" else 1
    bad = [
        p.id
        for p in split
        if (p.lexical["verb"] not in seen["verb"]) + (p.lexical["frame"] not in seen["frame"]) != need
    ]
    if bad:
        raise StimulusError(
            f"{len(bad)} {name} pair(s) are not held out in exactly {need} factor(s): {', '.join(bad[:10])}. "
            "Fix the verb/frame lists in compositional.json."
        )


@cache
def _all_splits() -> dict[str, tuple[MinimalPair, ...]]:
    data = _data("compositional")
    verbs, frames, names, sizes = data["verbs"], data["frames"], data["name_pairs"], data["sizes"]
    train = _build("comp_train", _combos(verbs["train"], frames["train"]), names["shared"], sizes["train"], data)
    loose_combos = _combos(verbs["held_out"], frames["train"]) + _combos(verbs["train"], frames["held_out"])
    loose = _build("comp_loose", loose_combos, names["shared"], sizes["loose"], data)
    strict_combos = _combos(verbs["held_out"], frames["held_out"])
    strict = _build("comp_strict", strict_combos, names["shared"], sizes["strict"], data)
    s240_combos = _combos(verbs["strict240"], frames["strict240"])
    strict240 = _build("strict240", s240_combos, names["strict240"], len(s240_combos) * len(names["strict240"]), data)
    audit_held_out(train, loose, "loose")
    audit_held_out(train, strict, "strict")
    audit_no_overlap(train, strict240)
    return {
        "comp_train": tuple(train),
        "comp_loose": tuple(loose),
        "comp_strict": tuple(strict),
        "strict240": tuple(strict240),
    }


def generate_compositional(name: str) -> list[MinimalPair]:
    """Return one compositional set: ``comp_train`` (398), ``comp_loose`` (142), ``comp_strict`` (25) or
    ``strict240`` (240). The splits are generated and audited together, once per process.

    Example:
        >>> len(generate_compositional("comp_strict"))
        25
    """
    if name not in COMPOSITIONAL_SETS:
        raise StimulusError(f"Unknown compositional set {name!r}; choose one of: {', '.join(COMPOSITIONAL_SETS)}.")
    return list(_all_splits()[name])
