"""Monitor figures: the current mean trajectory per lens, and accuracy vs dip over training steps (Fig. 9 a/b).

Both are drawn for TensorBoard's image cards, which show an image at most a few hundred pixels wide: one column of
panels :data:`PANEL_WIDTH` inches wide at :data:`DPI` (480 px), with :data:`FONT_SIZE`-point labels, so the text
stays legible without opening the image at full size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from dipreg.plots import family_trajectory_figure
from dipreg.trajectory import Trajectories

#: Panel size in inches, resolution and base font size of the monitor figures (480 × 300 px per panel).
PANEL_WIDTH = 4.8
PANEL_HEIGHT = 3.0
DPI = 100
FONT_SIZE = 12


#: The y label of a monitor trajectory panel: the audit's "sign(DiD(L))·DiD(ℓ), mean & IQR" is taller than a
#: 3-inch panel at 12 points (272 px against 220), so the statistic moves into the panel title.
TRAJECTORY_YLABEL = "sign(DiD(L))·DiD(ℓ)"


def trajectory_figure(by_lens: Mapping[str, Trajectories]) -> Figure:
    """Mean output-aligned DiD per family (inter-quartile band) against relative depth, one panel per lens, stacked
    in one column (the audit's figure, with a y label short enough for the panel)."""
    fig = family_trajectory_figure(
        by_lens, stacked=True, panel_size=(PANEL_WIDTH, PANEL_HEIGHT), fontsize=FONT_SIZE, dpi=DPI
    )
    for ax in fig.axes:
        ax.set_ylabel(TRAJECTORY_YLABEL, fontsize=FONT_SIZE)
        ax.set_title(f"{ax.get_title()} · mean, IQR band", fontsize=FONT_SIZE + 1)
    return fig


def history_figure(history: Sequence[Mapping[str, float]], lenses: Sequence[str]) -> Figure:
    """(a) held-out accuracy over steps; (b) mean ``max_wrong_dip`` per lens over steps; stacked, sharing the steps."""
    steps = [h["step"] for h in history]
    fig, (ax_acc, ax_dip) = plt.subplots(2, 1, figsize=(PANEL_WIDTH, 2 * PANEL_HEIGHT), sharex=True, dpi=DPI)
    ax_acc.plot(steps, [h.get(f"dip/{lenses[0]}/accuracy", float("nan")) for h in history], marker="o")
    ax_acc.set_ylim(-0.02, 1.02)
    ax_acc.set_ylabel("held-out accuracy", fontsize=FONT_SIZE)
    ax_acc.set_title("(a) output view", fontsize=FONT_SIZE + 1)
    for lens in lenses:  # a lens read on some probes only (causal_every) is drawn through the probes that read it
        key = f"dip/{lens}/max_wrong_dip"
        read = [h for h in history if key in h]
        ax_dip.plot([h["step"] for h in read], [h[key] for h in read], marker="o", label=lens)
    ax_dip.set_xlabel("step", fontsize=FONT_SIZE)
    ax_dip.set_ylabel("mean max_wrong_dip", fontsize=FONT_SIZE)
    ax_dip.set_title("(b) internal view", fontsize=FONT_SIZE + 1)
    ax_dip.legend(fontsize=FONT_SIZE - 2)
    for ax in (ax_acc, ax_dip):
        ax.tick_params(labelsize=FONT_SIZE - 1)
    fig.tight_layout()
    return fig
