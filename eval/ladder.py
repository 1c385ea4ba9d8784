"""`dipreg ladder`: the base ↔ instruct causal-dip ladder (paper §4, Table 1, Figures 5 and 10).

For every ``BASE:INSTRUCT`` pair: the causal (patchscope) dip of each model on the same pairs and prompts, the
difference instruct − base with a paired t-test over items (scipy), an output-accuracy check, and the taxonomy
coordinates (Δ causal dip vs instruct commit depth; point size = the instruct model's RTN-w3 survival). A model
named in several pairs is measured once. The intact models are never changed (checksum after RTN w3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from dipreg.artifacts import prepare_out_dir, write_json
from dipreg.eval import stats
from dipreg.eval.degradation.operators import degrade
from dipreg.models import load_model
from dipreg.plots import save_figure
from dipreg.prompting import PromptFormat
from dipreg.stimuli import load_pairs
from dipreg.trajectory import trajectories, trajectories_by_lens
from dipreg.validation import validate_count

__all__ = ["ACCURACY_MATCH", "ladder_figure", "measure_model", "parse_ladder", "run_ladder", "verdict"]

#: Base and instruct accuracies within this distance count as "matched" (the paper's output-level control).
ACCURACY_MATCH = 0.05
ALPHA = 0.05


def parse_ladder(spec: str) -> list[tuple[str, str]]:
    """``"base1:inst1,base2:inst2"`` → ``[(base1, inst1), ...]``; a clear error on a malformed entry.

    A local path containing ``:`` cannot be named here; give it a symlink without one.
    """
    pairs = []
    for item in (p.strip() for p in spec.split(",")):
        if not item:
            continue
        base, sep, instruct = item.partition(":")
        if not sep or not base or not instruct or ":" in instruct:
            raise ValueError(
                f"--models entry {item!r} is not BASE:INSTRUCT (e.g. Qwen/Qwen2.5-3B:Qwen/Qwen2.5-3B-Instruct)."
            )
        pairs.append((base, instruct))
    if not pairs:
        raise ValueError("--models needs at least one BASE:INSTRUCT pair.")
    return pairs


def measure_model(
    name: str, pairs: list, *, prompt: str, batch_size: int, w3: bool, neutral_prompt: str | None = None
) -> dict[str, Any]:
    """Logit and causal trajectories of one model (one capture) and, if asked, its RTN-w3 accuracy."""
    model, tokenizer = load_model(name)
    options = {"causal": {"neutral_prompt": neutral_prompt}} if neutral_prompt else None
    lenses = trajectories_by_lens(
        model, tokenizer, pairs, ["logit", "causal"], batch_size=batch_size, prompt=prompt, lens_options=options
    )
    out: dict[str, Any] = {
        "summary": {lens: traj.summary()["all"] for lens, traj in lenses.items()},
        "causal_dip": lenses["causal"].max_wrong_dip.tolist(),
        "logit_dip": lenses["logit"].max_wrong_dip.tolist(),
        "correct": lenses["logit"].correct.tolist(),
        "w3_accuracy": None,
    }
    if w3:
        with degrade(model, "rtn", verify=True, bits=3):
            out["w3_accuracy"] = float(
                trajectories(model, tokenizer, pairs, batch_size=batch_size, prompt=prompt).correct.float().mean()
            )
    return out


def verdict(delta: float, p: float) -> str:
    """``amplifies`` / ``reverses`` when the paired t is significant at 0.05, else ``null``."""
    if p is None or math.isnan(p) or p >= ALPHA:
        return "null"
    return "amplifies" if delta > 0 else "reverses"


def ladder_figure(rows: Sequence[dict[str, Any]]) -> Figure:
    """(a) Δ causal dip (instruct − base) per pair, starred when the paired t is significant; (b) taxonomy:
    Δ causal dip vs instruct commit depth, point size = instruct RTN-w3 accuracy (fixed size when not measured)."""
    fig, (ax_a, ax_b) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [r["instruct"].rstrip("/").split("/")[-1] for r in rows]
    deltas = [r["delta_causal_dip"] for r in rows]
    colors = ["C3" if r["verdict"] == "amplifies" else "C0" if r["verdict"] == "reverses" else "0.6" for r in rows]
    ax_a.bar(range(len(rows)), deltas, color=colors)
    for k, r in enumerate(rows):
        if r["verdict"] != "null":
            ax_a.text(k, deltas[k], "*", ha="center", va="bottom" if deltas[k] >= 0 else "top")
    ax_a.axhline(0, color="k", linewidth=0.8)
    ax_a.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
    ax_a.set(title="(a) alignment amplification of the causal dip", ylabel="Δ causal dip (instruct − base)")
    for r, label in zip(rows, labels, strict=True):
        w3 = r["instruct_w3_accuracy"]
        size = 40 if w3 is None else 20 + 300 * w3
        ax_b.scatter(r["delta_causal_dip"], r["instruct_commit"], s=size, alpha=0.7)
        ax_b.annotate(label, (r["delta_causal_dip"], r["instruct_commit"]), fontsize=7)
    ax_b.axvline(0, color="k", linewidth=0.8)
    ax_b.set(
        title="(b) recipe taxonomy (size: instruct RTN-w3 accuracy)",
        xlabel="Δ causal dip (instruct − base)",
        ylabel="instruct commit depth (logit lens)",
    )
    fig.tight_layout()
    return fig


def run_ladder(
    models: str,
    pairs_name: str = "core",
    out: str | Path = "runs/ladder",
    *,
    prompt: str = "raw",
    batch_size: int = 16,
    limit: int | None = None,
    w3: bool = True,
    neutral_prompt: str | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Measure every model of ``models`` (``BASE:INSTRUCT,...``), write ``ladder.json`` and ``ladder.png``.

    Bad options (``models``, batch size, ``limit`` (None = all, else >= 1), prompt style, the pair set) raise
    before ``out`` is created and before any model loads."""
    console = console or Console()
    # Every option is checked before the output folder is made and any model loads.
    ladder = parse_ladder(models)
    validate_count(batch_size, "--batch-size")
    if limit is not None:
        validate_count(limit, "--limit", 1, "omit it for all pairs")
    PromptFormat(prompt)  # type: ignore[arg-type]  # an unknown style raises here
    pairs = load_pairs(pairs_name)
    pairs = pairs if limit is None else pairs[:limit]
    out_dir = prepare_out_dir(out)
    names = list(dict.fromkeys(name for pair in ladder for name in pair))
    measured: dict[str, dict[str, Any]] = {}
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("models", total=len(names))
        for name in names:
            bar.update(task, description=f"measure {name}")
            measured[name] = measure_model(
                name, pairs, prompt=prompt, batch_size=batch_size, w3=w3, neutral_prompt=neutral_prompt
            )
            bar.advance(task)
    rows = []
    for base, instruct in ladder:
        b, i = measured[base], measured[instruct]
        test = stats.paired_t(i["causal_dip"], b["causal_dip"])
        acc_b, acc_i = b["summary"]["logit"]["accuracy"], i["summary"]["logit"]["accuracy"]
        rows.append(
            {
                "base": base,
                "instruct": instruct,
                "base_causal_dip": b["summary"]["causal"]["mean_max_wrong_dip"],
                "instruct_causal_dip": i["summary"]["causal"]["mean_max_wrong_dip"],
                "delta_causal_dip": test["mean_diff"],
                "paired_t": test["t"],
                "p": test["p"],
                "verdict": verdict(test["mean_diff"], test["p"]),
                "base_accuracy": acc_b,
                "instruct_accuracy": acc_i,
                "accuracy_matched": abs(acc_i - acc_b) <= ACCURACY_MATCH,
                "instruct_commit": i["summary"]["logit"]["mean_commit_layer_frac"],
                "instruct_causal_commit": i["summary"]["causal"]["mean_commit_layer_frac"],
                "instruct_w3_accuracy": i["w3_accuracy"],
                "notes": test["notes"],
            }
        )
    payload = {
        "pairs": str(pairs_name),
        "num_pairs": len(pairs),
        "prompt": prompt,
        "accuracy_match_tolerance": ACCURACY_MATCH,
        "ladder": rows,
        "models": measured,
    }
    write_json(out_dir / "ladder.json", payload)
    save_figure(ladder_figure(rows), out_dir / "ladder.png")
    table = Table(title=f"dipreg ladder — causal dip, instruct − base, on {pairs_name} (n={len(pairs)})")
    for column in ("base → instruct", "Δ causal dip", "paired t", "p", "verdict", "acc base/inst", "inst commit"):
        table.add_column(column, justify="left" if column == "base → instruct" else "right", overflow="fold")
    for r in rows:
        table.add_row(
            f"{r['base']} → {r['instruct']}",
            f"{r['delta_causal_dip']:+.3f}",
            "—" if r["paired_t"] is None or math.isnan(r["paired_t"]) else f"{r['paired_t']:.2f}",
            "—" if r["p"] is None or math.isnan(r["p"]) else f"{r['p']:.2g}",
            r["verdict"],
            f"{r['base_accuracy']:.3f}/{r['instruct_accuracy']:.3f}" + ("" if r["accuracy_matched"] else " (!)"),
            f"{r['instruct_commit']:.3f}",
        )
    console.print(table)
    console.print(f"wrote {out_dir / 'ladder.json'} and {out_dir / 'ladder.png'}")
    return payload
