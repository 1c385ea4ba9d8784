"""`dipreg audit`: trajectories of a pair set under one or more lenses -> table, audit.json, trajectories.png."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from dipreg.artifacts import prepare_out_dir, write_json
from dipreg.lenses import LENSES
from dipreg.lenses.tuned import resolve_lens_path
from dipreg.metrics import DEFAULT_WINDOW, validate_count, validate_window
from dipreg.models import load_model
from dipreg.plots import family_trajectory_figure, lens_comparison_figure, save_figure
from dipreg.prompting import PromptFormat
from dipreg.stimuli import load_pairs
from dipreg.trajectory import Trajectories, trajectories_by_lens


def summary_table(title: str, summary: dict[str, Any]) -> Table:
    """A rich table of a :meth:`Trajectories.summary`: all items, each family, the safety subset."""
    table = Table(title=title)
    for column in ("subset", "n", "accuracy", "strict acc", "mean dip", "mean commit", "late-binding"):
        table.add_column(column, justify="left" if column == "subset" else "right")
    rows = [("all", summary["all"])]
    rows += [(f"family: {name}", stats) for name, stats in summary["families"].items()]
    rows.append(("safety subset", summary["safety"]))
    for name, stats in rows:
        if not stats.get("n"):
            table.add_row(name, "0", "-", "-", "-", "-", "-")
            continue
        table.add_row(
            name,
            str(stats["n"]),
            f"{stats['accuracy']:.3f}",
            f"{stats['strict_accuracy']:.3f}",
            f"{stats['mean_max_wrong_dip']:.3f}",
            f"{stats['mean_commit_layer_frac']:.3f}",
            f"{stats['late_binding_rate']:.3f}",
        )
    return table


def check_lenses(lenses: Sequence[str], lens_options: dict[str, dict[str, Any]]) -> None:
    """Refuse an empty or unknown ``--lens`` and a ``--tuned-lens PATH`` with no lens file, before any model loads."""
    if not lenses:
        raise ValueError(f"--lens names no lens; choose from: {', '.join(LENSES)}.")
    unknown = [name for name in lenses if name not in LENSES]
    if unknown:
        raise ValueError(f"--lens: unknown lens(es) {', '.join(map(repr, unknown))}; choose from: {', '.join(LENSES)}.")
    path = lens_options.get("tuned", {}).get("path") if "tuned" in lenses else None
    if path is not None:
        resolve_lens_path(path)  # FileNotFoundError naming it and how to train one


def run_audit(
    model_name: str | None = None,
    pairs_name: str = "core",
    lenses: Sequence[str] = ("logit",),
    out: str | Path = "runs/audit",
    *,
    batch_size: int = 16,
    window: tuple[float, float] = DEFAULT_WINDOW,
    prompt: str = "auto",
    lens_options: dict[str, dict[str, Any]] | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Measure trajectories under every lens, print a table per lens, write ``audit.json`` and
    ``trajectories.png`` (plus ``lenses.png`` comparing the lenses when there are several) into ``out``, and
    return the JSON payload.

    ``audit.json`` holds ``items`` and ``summary`` of the first lens at top level, and every lens under
    ``lenses[name]``. ``lens_options[name]`` are passed to that lens's factory (e.g. ``{"tuned": {"path": P}}``).
    Bad options (window, batch size, lens names, a missing tuned-lens file, prompt style, the pair set) raise
    before ``out`` is created and before the model loads.
    """
    lenses = list(lenses)
    lens_options = {name: dict(lens_options.get(name, {})) for name in lenses} if lens_options else {}
    console = console or Console()
    # Every option is checked before the output folder is made and the model loads.
    window = validate_window(window, "--window")
    validate_count(batch_size, "--batch-size")
    check_lenses(lenses, lens_options)
    prompt_format = PromptFormat(prompt)  # type: ignore[arg-type]
    pairs = load_pairs(pairs_name)
    out_dir = prepare_out_dir(out)
    model, tokenizer = load_model(model_name)
    results: dict[str, Trajectories] = trajectories_by_lens(
        model,
        tokenizer,
        pairs,
        lenses,
        batch_size=batch_size,
        window=window,
        prompt=prompt_format,
        progress=True,
        lens_options=lens_options,
    )
    blocks = {name: {"items": t.item_records(), "summary": t.summary()} for name, t in results.items()}
    first = blocks[lenses[0]]
    payload = {
        "model": model_name or "default:SmolLM2-135M-Instruct",
        "pairs": str(pairs_name),
        "num_pairs": len(pairs),
        "num_layers": results[lenses[0]].num_layers,
        "window": list(window),
        "prompt": prompt_format.resolved(tokenizer),
        "lens": lenses[0],
        "lens_options": lens_options,
        "items": first["items"],
        "summary": first["summary"],
        "lenses": blocks,
    }
    write_json(out_dir / "audit.json", payload)
    save_figure(family_trajectory_figure(results), out_dir / "trajectories.png")
    figures = "trajectories.png"
    if len(results) > 1:
        save_figure(lens_comparison_figure(results), out_dir / "lenses.png")
        figures += " and lenses.png"
    for name, block in blocks.items():
        console.print(
            summary_table(f"dipreg audit — {payload['model']} on {pairs_name} ({name} lens)", block["summary"])
        )
    console.print(f"wrote {out_dir / 'audit.json'}, {figures}")
    return payload
