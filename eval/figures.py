"""Figures of degradation runs (matplotlib, Agg backend): the paper's Figure 6, high- vs low-dip tertile flips."""

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
