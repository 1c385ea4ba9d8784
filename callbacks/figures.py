"""Monitor figures: the current mean trajectory per lens, and accuracy vs dip over training steps (Fig. 9 a/b)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from dipreg.plots import family_trajectory_figure
from dipreg.trajectory import Trajectories


def trajectory_figure(by_lens: Mapping[str, Trajectories]) -> Figure:
    """Mean DiD per family against relative depth, one panel per lens (the audit's figure)."""
    return family_trajectory_figure(by_lens)


def history_figure(history: Sequence[Mapping[str, float]], lenses: Sequence[str]) -> Figure:
    """(a) held-out accuracy over steps; (b) mean ``max_wrong_dip`` per lens over steps."""
    steps = [h["step"] for h in history]
    fig, (ax_acc, ax_dip) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax_acc.plot(steps, [h.get(f"dip/{lenses[0]}/accuracy", float("nan")) for h in history], marker="o")
    ax_acc.set_ylim(-0.02, 1.02)
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("held-out pair accuracy")
    ax_acc.set_title("(a) output view")
    for lens in lenses:  # a lens read on some probes only (causal_every) is drawn through the probes that read it
        key = f"dip/{lens}/max_wrong_dip"
        read = [h for h in history if key in h]
        ax_dip.plot([h["step"] for h in read], [h[key] for h in read], marker="o", label=lens)
    ax_dip.set_xlabel("step")
    ax_dip.set_ylabel("mean max_wrong_dip")
    ax_dip.set_title("(b) internal view")
    ax_dip.legend(fontsize=8)
    fig.tight_layout()
    return fig
