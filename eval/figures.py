"""Figures of degradation runs (matplotlib, Agg backend): the paper's Figure 6 (high- vs low-dip tertile flips)
and Figure 7 (the bridge ladder: clean accuracy and flips per readout)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure


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


def _flip_panel(ax: Any, conditions: Mapping[str, Mapping[str, Any]], readouts: list[str], title: str) -> None:
    """Grouped bars: flip rate of each readout per condition, each bar annotated with flips / items at risk and the
    semantic-dip MW p."""
    labels = list(conditions)
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(readouts))
    for j, name in enumerate(readouts):
        rates = [conditions[c]["readouts"][name]["flip_rate"] for c in labels]
        heights = np.nan_to_num(np.array(rates, dtype=float))
        pos = x - 0.4 + width * (j + 0.5)
        ax.bar(pos, heights, width, label=name)
        for xi, c, h in zip(pos, labels, heights, strict=True):
            res = conditions[c]["readouts"][name]
            p = res["stratification"]["semantic_dip"]["mw_p"]
            text = f"{res['n_flips']}/{res['n_at_risk']}" + (f" p={p:.2g}" if p is not None and np.isfinite(p) else "")
            ax.annotate(text, (xi, h), ha="center", va="bottom", fontsize=6, rotation=90)
    ax.set_xticks(x, labels, rotation=15, ha="right", fontsize=8)
    ax.set_ylim(0, 1.3)
    ax.set_ylabel("flip rate (correct clean → wrong)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def bridge_figure(payload: Mapping[str, Any]) -> Figure:
    """The paper's Figure 7 for one ``dipreg bridge`` run: (a) clean pair and strict accuracy per readout,
    (b) flip rate per readout under each structural operator, (c) under each prompt intervention (the contrast
    class); bars in (b, c) are annotated with flips / items at risk and the Mann–Whitney p of the intact semantic
    dip (flips vs survivors)."""
    readouts = list(payload["clean"])
    panels = [
        (title, conditions)
        for title, conditions in (
            ("structural damage", payload["operators"]),
            ("prompt interventions (contrast class)", payload["interventions_results"]),
        )
        if conditions
    ]
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(4.2 + 5.2 * len(panels), 4.0), squeeze=False)
    ax = axes[0][0]
    x = np.arange(len(readouts))
    pair = [payload["clean"][r]["accuracy"] for r in readouts]
    strict = [payload["clean"][r]["strict_accuracy"] for r in readouts]
    ax.bar(x - 0.2, pair, 0.4, label="pair accuracy")
    ax.bar(x + 0.2, strict, 0.4, label="strict (both contexts)")
    ax.axhline(0.5, color="0.5", lw=0.8, ls="--")
    ax.set_xticks(x, readouts, rotation=15, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"(a) clean accuracy (n={payload['num_vignettes']})", fontsize=9)
    ax.legend(fontsize=7)
    for ax, letter, (title, conditions) in zip(axes[0][1:], "bc", panels, strict=False):
        _flip_panel(ax, conditions, readouts, f"({letter}) {title}")
    fig.suptitle("Bridge ladder: flips per readout (flips/at risk, semantic-dip Mann–Whitney p)", fontsize=10)
    fig.tight_layout()
    return fig
