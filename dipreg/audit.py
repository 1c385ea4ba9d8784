"""`dipreg audit`: trajectories of a pair set under one or more lenses -> table, audit.json, trajectories.png."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from dipreg.artifacts import prepare_out_dir, write_json
from dipreg.lenses import LENSES
from dipreg.lenses.tuned import resolve_lens_path
from dipreg.metrics import DEFAULT_WINDOW
from dipreg.models import load_model
from dipreg.plots import family_trajectory_figure, lens_comparison_figure, save_figure
from dipreg.prompting import DEFAULT_AUDIT_PROMPT, PromptFormat
from dipreg.stimuli import load_pairs
from dipreg.trajectory import DEGENERATE_SHARE, Trajectories, degenerate_answer, trajectories_by_lens
from dipreg.validation import validate_count, validate_window

#: The prompt style `dipreg audit` uses unless told: the one on which the default model is least degenerate.
#: `dipreg prompt-styles` on the default model, core set, logit lens: strict accuracy raw 0.043, chat 0.000 (every
#: context answered t_neg), fewshot 0.086 (t_pos / t_neg shares 0.565 / 0.435); see README "dipreg audit".

#: Columns of :func:`summary_table` after ``subset`` and ``n``, with the summary key each shows.
TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("acc", "accuracy"),
    ("strict\nacc", "strict_accuracy"),
    ("answers\nt_pos", "answer_pos_share"),
    ("answers\nt_neg", "answer_neg_share"),
    ("mean\ndip", "mean_max_wrong_dip"),
    ("mean\ncommit", "mean_commit_layer_frac"),
    ("late\nbinding", "late_binding_rate"),
)

#: Below every table: what the rows and the two share columns are.
TABLE_CAPTION = (
    "rows: all items, each family (indented), the safety subset; answers t_pos / t_neg: share of the 2n contexts "
    "answered with that candidate at the last layer"
)


def summary_table(title: str, summary: dict[str, Any]) -> Table:
    """A rich table of a :meth:`Trajectories.summary`: all items, each family, the safety subset.

    ``answers t_pos`` / ``answers t_neg`` are the shares of the subset's contexts answered with each candidate at
    the last layer. ``title`` is shown as plain text (never read as Rich markup).
    """
    table = Table(title=Text(title), box=box.SIMPLE_HEAVY, show_edge=False, padding=(0, 0, 0, 1), caption=TABLE_CAPTION)
    table.add_column("subset", justify="left", no_wrap=True, min_width=13)
    table.add_column("n", justify="right", no_wrap=True, min_width=4)
    for column, _ in TABLE_COLUMNS:  # two-line headers and one-space padding: fits an 80-column terminal
        table.add_column(column, justify="right", no_wrap=True)
    rows = [("all", summary["all"])]
    rows += [(f"  {name}", stats) for name, stats in summary["families"].items()]
    rows.append(("safety subset", summary["safety"]))
    for name, stats in rows:
        if not stats.get("n"):
            table.add_row(Text(name), "0", *("-" for _ in TABLE_COLUMNS))
            continue
        table.add_row(Text(name), str(stats["n"]), *(f"{stats[key]:.3f}" for _, key in TABLE_COLUMNS))
    return table


def degenerate_warning(lens: str, degenerate: dict[str, Any]) -> Text:
    """The one-line console warning for a lens whose contexts are almost all answered with one candidate."""
    text = Text("warning: ", style="bold yellow")
    text.append(
        f"{lens} lens: the model answers {degenerate['side']} in {degenerate['share']:.1%} of all contexts "
        f"(≥ {DEGENERATE_SHARE:.0%}), whatever the context; accuracy (DiD(L) > 0) then measures only how the margin "
        "moves between the two contexts of a pair, and strict accuracy is the honest number."
    )
    return text


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
    prompt: str = DEFAULT_AUDIT_PROMPT,
    lens_options: dict[str, dict[str, Any]] | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Measure trajectories under every lens, print a table per lens, write ``audit.json`` and
    ``trajectories.png`` (plus ``lenses.png`` comparing the lenses when there are several) into ``out``, and
    return the JSON payload.

    ``audit.json`` holds ``items`` and ``summary`` of the first lens at top level, and every lens under
    ``lenses[name]``; ``degenerate`` is ``{"lens", "side", "share"}`` for the first lens whose contexts are
    answered with one candidate in ≥ :data:`~dipreg.trajectory.DEGENERATE_SHARE` of cases (then a warning is
    printed), else ``None`` (each lens block has its own ``degenerate``, without ``lens``). The progress bar counts
    contexts and shows the time left; the last line names the prompt style (:data:`DEFAULT_AUDIT_PROMPT` unless
    ``prompt`` says otherwise; ``auto`` resolved to ``chat`` or ``raw``; ``fewshot`` with its number of worked
    examples), also written as ``prompt`` (and ``prompt_shots`` for ``fewshot``) into ``audit.json``.
    ``lens_options[name]`` are passed to that lens's factory (e.g. ``{"tuned": {"path": P}}``).
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
    blocks: dict[str, dict[str, Any]] = {}
    for name, traj in results.items():
        summary = traj.summary()
        degenerate_all = degenerate_answer(summary["all"])
        blocks[name] = {"items": traj.item_records(), "summary": summary, "degenerate": degenerate_all}
    first = blocks[lenses[0]]
    degenerate = next(({"lens": name, **b["degenerate"]} for name, b in blocks.items() if b["degenerate"]), None)
    resolved_prompt = prompt_format.resolved(tokenizer)
    payload = {
        "model": model_name or "default:SmolLM2-135M-Instruct",
        "pairs": str(pairs_name),
        "num_pairs": len(pairs),
        "num_layers": results[lenses[0]].num_layers,
        "window": list(window),
        "prompt": resolved_prompt,
        "prompt_shots": prompt_format.shots if resolved_prompt == "fewshot" else None,
        "lens": lenses[0],
        "lens_options": lens_options,
        "items": first["items"],
        "summary": first["summary"],
        "degenerate": degenerate,
        "lenses": blocks,
    }
    write_json(out_dir / "audit.json", payload)
    figure = family_trajectory_figure(results, model=payload["model"], pairs=str(pairs_name))
    save_figure(figure, out_dir / "trajectories.png")
    figures = "trajectories.png"
    if len(results) > 1:
        save_figure(lens_comparison_figure(results), out_dir / "lenses.png")
        figures += " and lenses.png"
    for name, block in blocks.items():
        console.print(
            summary_table(f"dipreg audit — {payload['model']} on {pairs_name} ({name} lens)", block["summary"])
        )
        if block["degenerate"]:
            console.print(degenerate_warning(name, block["degenerate"]))
    console.print(Text(f"prompt style: {prompt_format.describe(tokenizer)}; wrote {out_dir / 'audit.json'}, {figures}"))
    return payload
