"""`dipreg degrade`: measure the intact model once, then each degradation -> table, degrade.json, figure.

The dip and the margin are always read on the intact model; each degraded run uses the same prompts through
``dipreg.trajectories``. After every operator the model's checksum is compared with the intact one.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

from dipreg.artifacts import prepare_out_dir, write_json
from dipreg.eval.degradation.ledger import state_checksum
from dipreg.eval.degradation.operators import degrade, op_label, parse_ops
from dipreg.eval.degradation.presets import DEFAULT_OPS
from dipreg.eval.stats import operator_result
from dipreg.metrics import DEFAULT_WINDOW
from dipreg.models import load_model
from dipreg.plots import save_figure
from dipreg.prompting import PromptFormat
from dipreg.stimuli import load_pairs
from dipreg.trajectory import Trajectories, trajectories
from dipreg.validation import validate_count, validate_window


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None or value != value else format(value, spec)


def tertile_flip_figure(results: Mapping[str, Mapping[str, Any]], predictor: str = "dip") -> Figure:
    """Grouped bars per operator: flip rate of the low and the high tertile of the intact ``predictor``.

    Args:
        results: operator label -> its result block holding ``stratification[predictor]`` (see ``run_degrade``).
        predictor: ``"dip"`` (intact max_wrong_dip) or ``"margin"`` (intact |DiD(L)|).
    """
    labels = list(results)
    low = [results[k]["stratification"][predictor]["low_tertile_flip_rate"] for k in labels]
    high = [results[k]["stratification"][predictor]["high_tertile_flip_rate"] for k in labels]
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(labels) + 2), 3.8))
    ax.bar(x - 0.2, np.nan_to_num(np.array(low, dtype=float)), 0.4, label=f"low-{predictor} tertile")
    ax.bar(x + 0.2, np.nan_to_num(np.array(high, dtype=float)), 0.4, label=f"high-{predictor} tertile")
    for i, key in enumerate(labels):
        p = results[key]["stratification"][predictor]["mw_p"]
        if p is not None and np.isfinite(p):
            ax.annotate(
                f"p={p:.2g}", (x[i], max(np.nan_to_num([low[i], high[i]]))), ha="center", va="bottom", fontsize=7
            )
    ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("flip rate (correct intact → wrong)")
    ax.set_title(f"Flips by intact {predictor} tertile (Mann–Whitney p annotated)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def results_table(title: str, intact_acc: float, results: dict[str, dict[str, Any]]) -> Table:
    """One row per operator: accuracy, flips, high/low tertile flip rates, Mann–Whitney p and Spearman ρ of the
    intact dip and of the intact margin |DiD(L)|, McNemar p (intact vs degraded). Everything is in the JSON."""
    table = Table(title=title)
    columns = ["operator", "acc", "flips", "dip hi/lo", "dip p", "dip ρ", "marg hi/lo", "marg p", "marg ρ", "McN p"]
    for column in columns:
        if column == "operator":
            table.add_column(column, overflow="fold")
        else:
            table.add_column(column, justify="right", no_wrap=True)
    table.add_row("intact", f"{intact_acc:.3f}", "-", *["-"] * (len(columns) - 3))
    for label, res in results.items():
        dip, mar = res["stratification"]["dip"], res["stratification"]["margin"]
        table.add_row(
            label,
            f"{res['accuracy']:.3f}",
            str(res["n_flips"]),
            f"{_fmt(dip['high_tertile_flip_rate'], '.2f')}/{_fmt(dip['low_tertile_flip_rate'], '.2f')}",
            _fmt(dip["mw_p"], ".2g"),
            _fmt(dip["spearman_rho"], ".2f"),
            f"{_fmt(mar['high_tertile_flip_rate'], '.2f')}/{_fmt(mar['low_tertile_flip_rate'], '.2f')}",
            _fmt(mar["mw_p"], ".2g"),
            _fmt(mar["spearman_rho"], ".2f"),
            _fmt(res["mcnemar"]["p"], ".2g"),
        )
    return table


def predictor_table(results: dict[str, dict[str, Any]]) -> Table:
    """The two intact-model predictors side by side per operator: rank-biserial and Mann–Whitney p (dying vs
    surviving), high/low-tertile flip rates and Spearman ρ of the dip and of the margin |DiD(L)|, and the verdict of
    :func:`~dipreg.eval.stats.death_carrier` (which one carries the deaths)."""
    table = Table(title="Dip vs intact margin: which predictor carries each operator's deaths")
    table.add_column("operator", overflow="fold")
    for column in ["flips", "dip r", "dip p", "dip hi/lo", "dip ρ", "marg r", "marg p", "marg hi/lo", "marg ρ"]:
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("carrier")
    for label, res in results.items():
        cells = []
        for predictor in ("dip", "margin"):
            st = res["stratification"][predictor]
            cells += [
                _fmt(st["rank_biserial"], "+.2f"),
                _fmt(st["mw_p"], ".2g"),
                f"{_fmt(st['high_tertile_flip_rate'], '.2f')}/{_fmt(st['low_tertile_flip_rate'], '.2f')}",
                _fmt(st["spearman_rho"], "+.2f"),
            ]
        table.add_row(label, str(res["n_flips"]), *cells, res["carrier"]["carrier"])
    return table


def run_degrade(
    model_name: str | None = None,
    pairs_name: str = "core",
    ops: str = DEFAULT_OPS,
    out: str | Path = "runs/degrade",
    *,
    batch_size: int = 16,
    window: tuple[float, float] = DEFAULT_WINDOW,
    prompt: str = "auto",
    console: Console | None = None,
) -> dict[str, Any]:
    """Run every operator of ``ops`` (CLI spec) on the model, write ``degrade.json`` and
    ``tertile_flips.png`` into ``out``, print the table, and return the JSON payload. Bad options (ops, window,
    batch size, prompt style, the pair set) raise before ``out`` is created and before the model loads."""
    console = console or Console()
    # Every option is checked before the output folder is made and the model loads.
    specs = parse_ops(ops)
    window = validate_window(window, "--window")
    validate_count(batch_size, "--batch-size")
    prompt_format = PromptFormat(prompt)  # type: ignore[arg-type]
    pairs = load_pairs(pairs_name)
    out_dir = prepare_out_dir(out)
    model, tokenizer = load_model(model_name)

    def measure() -> Trajectories:
        return trajectories(
            model, tokenizer, pairs, batch_size=batch_size, window=window, prompt=prompt_format, progress=True
        )

    checksum = state_checksum(model)  # recorded in degrade.json: the intact weights every row was measured against
    start = time.perf_counter()
    intact = measure()
    timings = {"intact_s": time.perf_counter() - start}
    results: dict[str, dict[str, Any]] = {}
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("operators", total=len(specs))
        for name, params in specs:
            label = op_label(name, params)
            bar.update(task, description=f"degrade {label}")
            start = time.perf_counter()
            with degrade(model, name, verify=True, tokenizer=tokenizer, **params) as report:
                degraded = measure()
            results[label] = {**operator_result(intact, degraded), "operator": report.as_dict()}
            results[label]["seconds"] = time.perf_counter() - start
            bar.advance(task)
    payload = {
        "model": model_name or "default:SmolLM2-135M-Instruct",
        "pairs": str(pairs_name),
        "num_pairs": len(pairs),
        "num_layers": intact.num_layers,
        "window": list(window),
        "prompt": prompt_format.resolved(tokenizer),
        "ops": ops,
        "intact": {
            "checksum": checksum,
            "summary": intact.summary(),
            "items": {
                "id": [p.id for p in pairs],
                "family": [p.family for p in pairs],
                "correct": intact.correct.tolist(),
                "max_wrong_dip": intact.max_wrong_dip.tolist(),
                "final_did": intact.did[:, -1].tolist(),
            },
        },
        "operators": results,
        "restored_checksum_verified": True,
        "timings": timings,
    }
    write_json(out_dir / "degrade.json", payload)
    save_figure(tertile_flip_figure(results, "dip"), out_dir / "tertile_flips.png")
    save_figure(tertile_flip_figure(results, "margin"), out_dir / "tertile_flips_margin.png")
    title = f"dipreg degrade — {payload['model']} on {pairs_name} (n={len(pairs)}; dip & margin from the intact model)"
    console.print(results_table(title, payload["intact"]["summary"]["all"]["accuracy"], results))
    console.print(predictor_table(results))
    for label, res in results.items():
        console.print(Text(f"{label}: {res['carrier']['line']}"))
    console.print(f"wrote {out_dir / 'degrade.json'}, {out_dir / 'tertile_flips.png'} and tertile_flips_margin.png")
    return payload
