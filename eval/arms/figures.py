"""Figures of `dipreg arms`: retention per condition (the paper's Figure 8) and the training-time monitor (Figure 9)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

__all__ = ["monitor_figure", "retention_figure"]


def retention_figure(table4: Sequence[dict[str, Any]]) -> Figure:
    """Grouped bars: accuracy per condition for the untrained model and each arm (mean ± sd over seeds)."""
    conditions = [row["condition"] for row in table4]
    arms = list(table4[0]["arms"]) if table4 else []
    series = ["untrained", *arms]
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(conditions))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(conditions)), 3.8))
    for k, name in enumerate(series):
        if name == "untrained":
            means, sds = [row["untrained"] for row in table4], [0.0] * len(table4)
        else:
            means = [row["arms"][name]["mean"] for row in table4]
            sds = [np.nan_to_num(row["arms"][name]["sd"]) for row in table4]
        ax.bar(x + (k - (len(series) - 1) / 2) * width, means, width, yerr=sds, capsize=2, label=name)
    ax.set_xticks(x, conditions, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("pair accuracy (eval set)")
    ax.set_ylim(0, 1.05)
    ax.set_title("Retention under compression per arm (mean ± sd over seeds)")
    ax.legend(fontsize=7, ncol=min(len(series), 4))
    fig.tight_layout()
    return fig


def _mean_curve(runs: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    by_step: dict[float, list[float]] = {}
    for run in runs:
        for h in run["monitor"]:
            if key in h:
                by_step.setdefault(h["step"], []).append(h[key])
    steps = sorted(by_step)
    return steps, [float(np.mean(by_step[s])) for s in steps]


def monitor_figure(runs: Sequence[dict[str, Any]], forecast: dict[str, Any]) -> Figure:
    """(a) probe accuracy over steps, (b) logit (solid) and causal (dashed) dip over steps, both as the mean
    over seeds per arm; (c) end-of-training logit dip vs final retention, one point per run."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    arms: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        arms.setdefault(run["arm"], []).append(run)
    colors = {arm: f"C{i}" for i, arm in enumerate(arms)}
    for arm, arm_runs in arms.items():
        steps, acc = _mean_curve(arm_runs, "dip/logit/accuracy")
        axes[0].plot(steps, acc, marker="o", color=colors[arm], label=arm)
        steps, dip = _mean_curve(arm_runs, "dip/logit/max_wrong_dip")
        axes[1].plot(steps, dip, marker="o", color=colors[arm], label=f"{arm} (logit)")
        steps, cdip = _mean_curve(arm_runs, "dip/causal/max_wrong_dip")
        axes[1].plot(steps, cdip, linestyle="--", color=colors[arm])
    axes[0].set(title="(a) held-out probe accuracy", xlabel="optimizer step", ylabel="accuracy", ylim=(0, 1.05))
    axes[1].set(title="(b) mean max wrong dip (-- causal)", xlabel="optimizer step", ylabel="dip")
    for p in forecast["runs"]:
        if p["retention"] is not None and p["end_logit_dip"] is not None:
            axes[2].scatter(p["end_logit_dip"], p["retention"], color=colors.get(p["arm"], "k"))
    rho = forecast["spearman_logit_dip_vs_retention"]["rho"]
    axes[2].set(
        title=f"(c) end dip vs retention\n({forecast['retention_condition']}; Spearman ρ={rho:.2f})",
        xlabel="end-of-training logit dip (probe)",
        ylabel="retention accuracy (eval set)",
    )
    axes[2].tick_params(axis="x", labelrotation=30)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig
