"""Render the `dipreg arms` results: the paper's Tables 3, 4, 5 and the monitor forecast, as Markdown
(``report.md``), self-contained HTML (``report.html``, figures inlined) and rich tables for the console.

Every cell is formatted from the JSON-ready dicts of :mod:`dipreg.eval.arms.stats`, which ``arms.json`` holds too.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from dipreg.eval.arms.stats import LENS_SHAPED_AGREEMENT_DROP, LENS_SHAPED_DIP_DROP

__all__ = ["ReportTable", "build_tables", "render_html", "render_markdown", "rich_table"]


@dataclass
class ReportTable:
    """One table of the report: a title, column names, string cells, and an optional note under it."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""


def _num(value: Any, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(value, spec)


def _ms(cell: dict[str, Any], spec: str = ".3f") -> str:
    if cell["n"] == 0:
        return "—"
    if cell["n"] == 1 or cell["sd"] is None or math.isnan(cell["sd"]):
        return _num(cell["mean"], spec)
    return f"{_num(cell['mean'], spec)} ± {_num(cell['sd'], spec)}"


def _p(value: Any) -> str:
    return _num(value, ".2g")


def build_tables(result: dict[str, Any]) -> list[ReportTable]:
    """The report's tables from the ``tables`` block of ``arms.json``."""
    tables = result["tables"]
    n_seeds = len(result["seeds"])
    t3 = ReportTable(
        title=f"Table 3 — arms on {result['eval_pairs']} (n={result['eval_n']}; mean ± sd over {n_seeds} seed(s))",
        columns=[
            "arm",
            "acc",
            "dip",
            "commit",
            "fragility",
            "NLL",
            f"acc after {tables['retention_condition']}",
            "step s",
            "step overhead",
        ],
        rows=[
            [
                row["arm"],
                _ms(row["accuracy"]),
                _ms(row["dip"]),
                _ms(row["commit"]),
                _ms(row["fragility"]),
                _ms(row["nll"]),
                _ms(row["retention"]),
                _ms(row["step_seconds"], ".2f") if "step_seconds" in row else "—",
                _num(row.get("step_overhead"), "+.0%"),
            ]
            for row in tables["table3"]
        ],
        note="dip, commit: logit lens, max_wrong_dip and commit_layer_frac. fragility: flip rate under late "
        "deprivation α=0 among items correct when clean (reliance on the late rescue). NLL: mean token NLL on "
        "the shipped general-prose corpus (capability-tax proxy). step s: median wall time of a training step "
        "(forward, backward, optimizer; monitor probes excluded); step overhead: vs output_only's (same machine, "
        "shared load makes it noisy; `dipreg bench` measures it under control).",
    )
    arms = [row["arm"] for row in tables["table3"] if row["arm"] != "untrained"]
    others = [a for a in arms if a != "output_only"]
    t4 = ReportTable(
        title="Table 4 — retention under compression (accuracy; mean ± sd over seeds)",
        columns=["condition", "untrained", *arms],
        rows=[
            [row["condition"], _num(row["untrained"]), *[_ms(row["arms"][a]) for a in arms]] for row in tables["table4"]
        ],
    )
    seeds = result["seeds"]
    mcnemar_rows = []
    for row in tables["table4"]:
        for arm in others:
            by_seed = {t["seed"]: t for t in row["mcnemar_vs_output_only"].get(arm, [])}
            cells = [
                f"{_p(by_seed[k]['p'])} ({by_seed[k]['b']}:{by_seed[k]['c']})" if k in by_seed else "—" for k in seeds
            ]
            mcnemar_rows.append([row["condition"], arm, *cells])
    t4b = ReportTable(
        title="Table 4b — exact McNemar vs output_only, per seed: p (items only the arm gets right : only output_only)",
        columns=["condition", "arm", *[f"seed {k}" for k in seeds]],
        rows=mcnemar_rows,
        note="One test within each seed pairing; discordant pairs are never pooled across seeds.",
    )
    t5_rows = tables["table5"]
    reference = t5_rows[-1].get("reference", "output_only") if t5_rows else "output_only"
    t5 = ReportTable(
        title="Table 5 — causal (patchscope) re-measurement of every arm, and lens agreement",
        columns=[
            "arm",
            "causal dip",
            "causal commit",
            "causal dip vs untrained",
            "causal dip vs output_only",
            "logit dip",
            "agreement ρ",
            "sign agreement",
            "flag",
        ],
        rows=[
            [
                r["arm"],
                _ms(r["causal_dip"]),
                _ms(r["causal_commit"]),
                _num(r["change_vs_untrained"], "+.0%"),
                _num(r.get("change_vs_output_only"), "+.0%"),
                _ms(r["logit_dip"]) if "logit_dip" in r else "—",
                _ms(r["agreement_spearman"]) if "agreement_spearman" in r else "—",
                _ms(r["agreement_sign"]) if "agreement_sign" in r else "—",
                f"lens-shaped repair ({', '.join(r.get('lens_shaped_reasons') or [])})"
                if r.get("lens_shaped_repair")
                else "",
            ]
            for r in t5_rows
        ],
        note="Changes: relative change of the arm-mean causal dip. Agreement (dipreg.agreement): per item, Spearman ρ "
        "and the share of same-sign layers between the logit-lens and the causal-lens DiD over the dip window, "
        "averaged over items (mean ± sd over seeds). Flag 'lens-shaped repair': a hinge arm whose logit dip is "
        f"≥ {LENS_SHAPED_DIP_DROP:.0%} below {reference}'s while its agreement ρ is ≥ {LENS_SHAPED_AGREEMENT_DROP:.2f} "
        f"below {reference}'s (agreement fell) or its causal dip is not below {reference}'s (causal dip did not "
        "fall).",
    )
    fc = tables["forecast"]
    rho_logit = _num(fc["spearman_logit_dip_vs_retention"]["rho"], ".2f")
    t6 = ReportTable(
        title=f"Monitor forecast — end-of-training dip vs {fc['retention_condition']} retention (one row per run)",
        columns=["arm", "seed", "saturated at step", "end acc", "end logit dip", "end causal dip", "retention"],
        rows=[
            [
                p["arm"],
                str(p["seed"]),
                _num(p["saturation_step"], ".0f"),
                _num(p["end_accuracy"]),
                _num(p["end_logit_dip"]),
                _num(p["end_causal_dip"]),
                _num(p["retention"]),
            ]
            for p in fc["runs"]
        ],
        note=(
            f"Spearman ρ across runs: logit dip vs retention {rho_logit}"
            f" (p={_p(fc['spearman_logit_dip_vs_retention']['p'])}); causal dip vs retention "
            f"{_num(fc['spearman_causal_dip_vs_retention']['rho'], '.2f')} "
            f"(p={_p(fc['spearman_causal_dip_vs_retention']['p'])}); probe accuracy vs retention "
            f"{_num(fc['spearman_accuracy_vs_retention']['rho'], '.2f')}. At the last probe the arm means spread "
            f"{_num(fc['end_accuracy_spread_across_arms'])} in accuracy and {_num(fc['end_dip_spread_across_arms'])} "
            f"in logit dip. Saturation: first probe with accuracy ≥ {fc['saturation_accuracy']}."
        ),
    )
    return [t3, t4, t4b, t5, t6]


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(result: dict[str, Any], tables: Sequence[ReportTable], figures: Sequence[str]) -> str:
    """``report.md``: a header with the run's settings, every table, and the figures by file name."""
    lines = [
        "# dipreg arms report",
        "",
        f"Model: `{result['model']}` · arms: {', '.join(result['arms'])} · seeds: {result['seeds']} · "
        f"evaluation set: `{result['eval_pairs']}` (n={result['eval_n']}) · prompt: {result['settings']['prompt']}"
        f" · quick: {result['quick']}",
        "",
    ]
    for table in tables:
        lines += [f"## {table.title}", "", "| " + " | ".join(map(_md_cell, table.columns)) + " |"]
        lines.append("|" + "---|" * len(table.columns))
        lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in table.rows]
        lines += ["", table.note, ""] if table.note else [""]
    for fig in figures:
        lines += [f"![{fig}]({fig})", ""]
    return "\n".join(lines)


def render_html(result: dict[str, Any], tables: Sequence[ReportTable], figures: Sequence[Path]) -> str:
    """``report.html``: the same content with the figures inlined as base64 PNG (one self-contained file)."""
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>dipreg arms report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
        "margin:1em 0}td,th{border:1px solid #bbb;padding:3px 8px;font-size:13px}th{background:#eee}"
        "p.note{font-size:12px;color:#444}</style></head><body>",
        "<h1>dipreg arms report</h1>",
        f"<p>Model: <code>{esc(result['model'])}</code> · arms: {esc(', '.join(result['arms']))} · seeds: "
        f"{esc(str(result['seeds']))} · evaluation set: <code>{esc(result['eval_pairs'])}</code> "
        f"(n={result['eval_n']}) · quick: {result['quick']}</p>",
    ]
    for table in tables:
        parts.append(f"<h2>{esc(table.title)}</h2><table><tr>")
        parts += [f"<th>{esc(c)}</th>" for c in table.columns]
        parts.append("</tr>")
        for row in table.rows:
            parts.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
        parts.append("</table>")
        if table.note:
            parts.append(f"<p class='note'>{esc(table.note)}</p>")
    for path in figures:
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        parts.append(
            f"<figure><img alt='{esc(Path(path).name)}' src='data:image/png;base64,{data}' "
            "style='max-width:100%'></figure>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def rich_table(table: ReportTable) -> Table:
    """A console table."""
    out = Table(title=table.title, caption=table.note or None)
    for i, column in enumerate(table.columns):
        out.add_column(column, overflow="fold", justify="left" if i == 0 else "right")
    for row in table.rows:
        out.add_row(*row)
    return out
