"""Prompt-level interface interventions (paper §5.6, Act 3): deterministic rewrites of a vignette's prompt.

They change how the question is asked, never the model and never what is correct, and keep the two options
identical across the pair. ``dipreg bridge`` uses them as the contrast class: flips they cause on the intact
model are interface failures, expected to be blind to the semantic dip.

- ``paraphrase``: the question reworded (``Vignette.paraphrase``).
- ``format_schema``: the options shown as ``(A)``/``(B)`` under "Options:" with an explicit reply format.
- ``synonym``: one content word (the verb in role binding, a noun otherwise) replaced by a synonym everywhere in
  the prompt (``Vignette.synonyms``), options and key words included.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence

from dipreg.stimuli import Vignette

Intervention = Callable[[Vignette], Vignette]


class InterventionError(ValueError):
    """Unknown intervention, or one that leaves a vignette unchanged."""


def paraphrase(v: Vignette) -> Vignette:
    """Ask the reworded question."""
    return dataclasses.replace(v, question=v.paraphrase, paraphrase=v.question)


def format_schema(v: Vignette) -> Vignette:
    """Show the options in the schema layout."""
    return dataclasses.replace(v, layout="schema")


def replace_words(text: str, synonyms: Mapping[str, str]) -> str:
    """Whole-word replacement of every ``word -> synonym``; a capitalised word gets a capitalised synonym."""
    for word, synonym in synonyms.items():
        text = re.sub(rf"(?<!\w){re.escape(word)}(?!\w)", synonym, text)
        text = re.sub(rf"(?<!\w){re.escape(word.capitalize())}(?!\w)", synonym.capitalize(), text)
    return text


def synonym(v: Vignette) -> Vignette:
    """Replace the vignette's content word(s) by their synonyms in stories, question, options and keys."""
    sub = lambda text: replace_words(text, v.synonyms)  # noqa: E731
    return dataclasses.replace(
        v,
        story_a=sub(v.story_a),
        story_b=sub(v.story_b),
        question=sub(v.question),
        paraphrase=sub(v.paraphrase),
        options=(sub(v.options[0]), sub(v.options[1])),
        keys=(tuple(sub(k) for k in v.keys[0]), tuple(sub(k) for k in v.keys[1])),
    )


INTERVENTIONS: dict[str, Intervention] = {
    "paraphrase": paraphrase,
    "format_schema": format_schema,
    "synonym": synonym,
}
#: What ``dipreg bridge`` runs without ``--interventions``.
DEFAULT_INTERVENTIONS: tuple[str, ...] = tuple(INTERVENTIONS)


def validate_interventions(names: Sequence[str]) -> None:
    """Unknown names are an error that lists the known ones."""
    unknown = [n for n in names if n not in INTERVENTIONS]
    if unknown:
        raise InterventionError(f"Unknown intervention(s) {unknown}; choose from: {', '.join(INTERVENTIONS)}.")


def intervene(name: str, vignettes: Sequence[Vignette]) -> list[Vignette]:
    """Apply intervention ``name`` to every vignette; an error names any vignette whose prompt it leaves unchanged."""
    validate_interventions([name])
    out = [INTERVENTIONS[name](v) for v in vignettes]
    unchanged = [v.id for v, w in zip(vignettes, out, strict=True) if v.prompt("a", "") == w.prompt("a", "")]
    if unchanged:
        raise InterventionError(f"Intervention {name!r} leaves the prompt of {', '.join(unchanged)} unchanged.")
    return out
