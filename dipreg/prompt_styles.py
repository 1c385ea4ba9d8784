"""`dipreg prompt-styles`: how degenerate a model is under each prompt style, on every built-in set.

For every pair set and prompt style it runs the logit-lens trajectories once and reports accuracy, strict accuracy
and the two answer shares (:meth:`dipreg.Trajectories.summary`). A model that answers one candidate in (almost)
every context is degenerate: its accuracy then only says how the margin moves, and strict accuracy is the honest
number. The vignettes enter as minimal pairs of their label readout (:func:`vignette_label_pairs`). This module
measures only; it never changes the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from dipreg.artifacts import prepare_out_dir, write_json
from dipreg.models import load_model
from dipreg.prompting import PROMPT_STYLES, PromptFormat
from dipreg.stimuli import BUILTIN_SETS, MinimalPair, Vignette, load_pairs, load_vignettes
from dipreg.trajectory import degenerate_answer, trajectories
from dipreg.validation import validate_count

#: What `dipreg prompt-styles` measures without --sets / --styles.
DEFAULT_SETS: tuple[str, ...] = (*BUILTIN_SETS, "vignettes")  # "vignettes": see load_set
DEFAULT_STYLES: tuple[str, ...] = ("raw", "chat", "fewshot")
#: The summary fields reported per set and style.
FIELDS: tuple[str, ...] = ("accuracy", "strict_accuracy", "answer_pos_share", "answer_neg_share", "mean_max_wrong_dip")
#: The set on which :func:`least_degenerate` ranks the styles.
RANKING_SET = "core"


def vignette_label_pairs(vignettes: Sequence[Vignette]) -> list[MinimalPair]:
    """The label readout of each vignette as a minimal pair: both contexts as the scoring readouts show them
    (story, question, A/B options, :data:`~dipreg.semantic.SCORING_INSTRUCTION`, ``Answer:``), ``t_pos`` = the
    label of the option correct in ``ctx_a`` (``" A"`` or ``" B"``), ``t_neg`` = the other label."""
    from dipreg.semantic import SCORING_INSTRUCTION

    labels = (" A", " B")
    return [
        MinimalPair(
            id=v.id,
            ctx_a=v.prompt("a", SCORING_INSTRUCTION),
            ctx_b=v.prompt("b", SCORING_INSTRUCTION),
            t_pos=labels[v.answer_a],
            t_neg=labels[v.answer_b],
            family=f"vignette_{v.family}",
            safety=v.safety,
            category=v.category,
        )
        for v in vignettes
    ]


#: The set name that selects every built-in vignette, as label-readout pairs (:func:`vignette_label_pairs`).
VIGNETTES = "vignettes"


def load_set(name: str) -> list[MinimalPair]:
    """A pair set by name: a built-in minimal-pair set, ``"vignettes"`` (as label pairs) or a JSONL file."""
    if name == VIGNETTES:
        return vignette_label_pairs(load_vignettes(VIGNETTES))
    return load_pairs(name)


def least_degenerate(results: dict[str, dict[str, dict[str, Any]]], on: str = RANKING_SET) -> str | None:
    """The style with the highest strict accuracy on set ``on`` (ties: the smaller majority answer share), or
    ``None`` when ``on`` was not measured."""
    measured = results.get(on, {})
    if not measured:
        return None

    def rank(style: str) -> tuple[float, float]:
        row = measured[style]
        return (-row["strict_accuracy"], max(row["answer_pos_share"], row["answer_neg_share"]))

    return min(measured, key=rank)


def styles_table(results: dict[str, dict[str, dict[str, Any]]], title: str) -> Table:
    """One row per set and style: n, accuracy, strict accuracy, both answer shares, mean dip, degenerate side."""
    table = Table(title=Text(title), box=box.SIMPLE_HEAVY, show_edge=False, padding=(0, 0, 0, 1))
    for column in ("set", "style", "n", "acc", "strict\nacc", "answers\nt_pos", "answers\nt_neg", "mean\ndip"):
        table.add_column(column, justify="left" if column in ("set", "style") else "right", no_wrap=True)
    table.add_column("degenerate", no_wrap=True)
    for set_name, by_style in results.items():
        for style, row in by_style.items():
            side = row["degenerate"]["side"] if row["degenerate"] else ""
            table.add_row(Text(set_name), style, str(row["n"]), *(f"{row[key]:.3f}" for key in FIELDS), side)
    return table


def run_prompt_styles(
    model_name: str | None = None,
    sets: Sequence[str] = DEFAULT_SETS,
    styles: Sequence[str] = DEFAULT_STYLES,
    out: str | Path = "runs/prompt-styles",
    *,
    batch_size: int = 16,
    shots: int = PromptFormat().shots,
    console: Console | None = None,
) -> dict[str, Any]:
    """Measure every set under every style (logit lens, one set and style at a time), print the table and
    write ``DIR/prompt_styles.json`` (rewritten after each measurement, so a stopped run keeps what it did).

    The JSON holds per set and style the fields of :data:`FIELDS`, ``n`` and ``degenerate``, and
    ``least_degenerate_on_core``: the style :func:`least_degenerate` picks. Unknown sets or styles and a batch
    size < 1 raise before ``out`` is created and before the model loads.
    """
    console = console or Console()
    validate_count(batch_size, "--batch-size")
    unknown = [s for s in styles if s not in PROMPT_STYLES]
    if not styles or unknown:
        raise ValueError(
            f"--styles: unknown or no style(s) {unknown or list(styles)}; choose from {', '.join(PROMPT_STYLES)}."
        )
    formats = {style: PromptFormat(style, shots=shots) for style in styles}  # type: ignore[arg-type]
    if not sets:
        raise ValueError("--sets names no pair set.")
    pair_sets = {name: load_set(name) for name in sets}
    out_dir = prepare_out_dir(out)
    model, tokenizer = load_model(model_name)
    payload: dict[str, Any] = {
        "model": model_name or "default:SmolLM2-135M-Instruct",
        "lens": "logit",
        "shots": shots,
        "styles": {style: fmt.describe(tokenizer) for style, fmt in formats.items()},
        "results": {},
        "least_degenerate_on_core": None,
    }
    for set_name, pairs in pair_sets.items():
        for style, fmt in formats.items():
            console.print(Text(f"{set_name} ({len(pairs)} pairs), prompt {fmt.describe(tokenizer)}"))
            traj = trajectories(model, tokenizer, pairs, "logit", batch_size=batch_size, prompt=fmt, progress=True)
            summary = traj.summary()["all"]
            row = {"n": summary["n"], **{key: summary[key] for key in FIELDS}, "degenerate": degenerate_answer(summary)}
            payload["results"].setdefault(set_name, {})[style] = row
            payload["least_degenerate_on_core"] = least_degenerate(payload["results"])
            write_json(out_dir / "prompt_styles.json", payload)
    console.print(styles_table(payload["results"], f"dipreg prompt-styles — {payload['model']} (logit lens)"))
    best = payload["least_degenerate_on_core"]
    note = f"least degenerate on {RANKING_SET} (highest strict accuracy): {best}; " if best else ""
    console.print(Text(f"{note}wrote {out_dir / 'prompt_styles.json'}"))
    return payload
