"""Figure of `dipreg bridge` (matplotlib, Agg backend): the paper's Figure 7, the bridge ladder (clean accuracy and
flips per readout under each degradation and each intervention)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure


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
