"""Single-token audit of candidate answers against a Hugging Face tokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .schema import MinimalPair, StimulusError

__all__ = ["audit_single_token", "candidate_token_ids"]


def _pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    """The text of each token, so a message shows how a candidate splits."""
    return [tokenizer.decode([i]) for i in ids]


def audit_single_token(pairs: Sequence[MinimalPair], tokenizer: Any) -> dict[str, tuple[int, int]]:
    """Check that every candidate is exactly one token and that ``t_pos`` and ``t_neg`` differ.

    Tokens come from ``tokenizer.encode(t, add_special_tokens=False)``. Returns ``{id: (pos_id, neg_id)}``.
    Raises :class:`StimulusError` listing every failing item (id, candidate, its split) at once; nothing is
    dropped silently.
    """
    result: dict[str, tuple[int, int]] = {}
    problems: list[str] = []
    for pair in pairs:
        if pair.id in result:
            problems.append(f"{pair.id}: duplicate id")
            continue
        ids: list[int] = []
        for name in ("t_pos", "t_neg"):
            text = getattr(pair, name)
            toks = list(tokenizer.encode(text, add_special_tokens=False))
            if len(toks) != 1:
                split = _pieces(tokenizer, toks)
                problems.append(f"{pair.id}: {name} {text!r} is {len(toks)} tokens {split!r}")
            else:
                ids.append(toks[0])
        if pair.t_pos == pair.t_neg or (len(ids) == 2 and ids[0] == ids[1]):
            problems.append(f"{pair.id}: t_pos and t_neg are the same token ({pair.t_pos!r})")
        elif len(ids) == 2:
            result[pair.id] = (ids[0], ids[1])
    if problems:
        raise StimulusError(
            f"{len(problems)} candidate problem(s) for this tokenizer:\n  "
            + "\n  ".join(problems)
            + "\nChoose single-token candidates (including the leading space, e.g. ' Yes') that differ "
            "within each pair, or remove these items from the set."
        )
    return result


def candidate_token_ids(pairs: Sequence[MinimalPair], tokenizer: Any) -> tuple[list[int], list[int]]:
    """Return the audited ``(t_pos ids, t_neg ids)`` in the order of ``pairs``."""
    ids = audit_single_token(pairs, tokenizer)
    return [ids[p.id][0] for p in pairs], [ids[p.id][1] for p in pairs]
