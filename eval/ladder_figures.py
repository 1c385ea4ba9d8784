"""Figure of `dipreg ladder`: the causal-dip ladder (paper Figure 5) and the recipe taxonomy (Figure 10)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

__all__ = ["ladder_figure"]


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
