"""Figures of DiD trajectories (matplotlib, Agg backend). Figures are returned or saved, then closed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure
from torch import Tensor

from dipreg.metrics import aligned_did
from dipreg.trajectory import Trajectories


@dataclass(frozen=True)
class AlignedCurves:
    """Per-layer curves of a group of items, each ``(L,)``.

    Attributes:
        mean: mean output-aligned DiD ``sign(DiD(L))·DiD(ℓ)`` over the items.
        q25: its 25th percentile across items (linear interpolation).
        q75: its 75th percentile across items.
        signed_mean: mean raw DiD (items with opposite output signs cancel here).
    """

    mean: Tensor
    q25: Tensor
    q75: Tensor
    signed_mean: Tensor


def aligned_curves(did: Tensor, rows: Sequence[int] | None = None) -> AlignedCurves:
    """:class:`AlignedCurves` of the ``(N, L)`` trajectories ``did`` (only ``rows`` of them when given).

    Items with a non-finite entry are left out (they have no reading); with none left every curve is NaN.
    """
    did = did if rows is None else did[list(rows)]
    did = did[torch.isfinite(did).all(dim=-1)].double()
    if did.shape[0] == 0:
        nan = torch.full(did.shape[-1:], float("nan"), dtype=torch.float64)
        return AlignedCurves(nan, nan, nan, nan)
    aligned = aligned_did(did)
    q25, q75 = torch.quantile(aligned, torch.tensor([0.25, 0.75], dtype=torch.float64), dim=0)
    return AlignedCurves(aligned.mean(0), q25, q75, did.mean(0))


def panel_title(lens: str, n: int, model: str | None = None, pairs: str | None = None) -> str:
    """``"MODEL · PAIRS\nLENS lens · n=N"`` (two lines, so a long model name fits a panel), leaving out what is
    not known."""
    head = " · ".join(part for part in (model, pairs) if part)
    return (f"{head}\n" if head else "") + f"{lens} lens · n={n}"


def family_trajectory_figure(
    by_lens: Mapping[str, Trajectories],
    *,
    model: str | None = None,
    pairs: str | None = None,
    stacked: bool = False,
    panel_size: tuple[float, float] = (5.2, 3.8),
    fontsize: float | None = None,
    dpi: float | None = None,
) -> Figure:
    """One panel per lens, per family against relative depth: the mean output-aligned DiD
    ``sign(DiD(L))·DiD(ℓ)`` (the quantity the dip is defined on) with its inter-quartile band across items shaded,
    and the mean signed DiD as a thin dashed line (items with opposite output signs cancel there); the wrong side
    (< 0: the layer prefers the answer the model will reject) shaded, the dip window marked.

    Args:
        by_lens: trajectories per lens name.
        model: model name for the panel titles (left out when ``None``).
        pairs: pair-set name for the panel titles (left out when ``None``).
        stacked: panels in one column (a narrow figure, e.g. for a TensorBoard image card) instead of one row, with
            one legend below them instead of one per panel (every lens has the same families).
        panel_size: inches per panel.
        fontsize: axis-label size in points (title +1, ticks −1, legend −2); default matplotlib's, legend 7.
        dpi: figure resolution; default matplotlib's.
    """
    rows, cols = (len(by_lens), 1) if stacked else (1, len(by_lens))
    figsize = (panel_size[0] * cols, panel_size[1] * rows)
    legend_size = 7 if fontsize is None else fontsize - 2
    if stacked:  # room for the shared legend: families plus two shadings, two per row
        entries = len({p.family for traj in by_lens.values() for p in traj.pairs}) + 3
        figsize = (figsize[0], figsize[1] + (entries + 1) // 2 * legend_size * 1.5 / 72 + 0.1)
    fig, axes = plt.subplots(
        rows, cols, figsize=figsize, squeeze=False, dpi=dpi, layout="constrained" if stacked else None
    )
    label = {} if fontsize is None else {"fontsize": fontsize}
    title = {} if fontsize is None else {"fontsize": fontsize + 1}
    for ax, (lens, traj) in zip(axes.flat, by_lens.items(), strict=True):
        depth = (traj.did.new_tensor(range(1, traj.num_layers + 1)) / traj.num_layers).numpy()
        families = sorted({p.family for p in traj.pairs})
        for family in families:
            rows_of = [i for i, p in enumerate(traj.pairs) if p.family == family]
            curves = aligned_curves(traj.did, rows_of)
            (line,) = ax.plot(depth, curves.mean.numpy(), marker=".", label=f"{family} (n={len(rows_of)})")
            ax.fill_between(depth, curves.q25.numpy(), curves.q75.numpy(), color=line.get_color(), alpha=0.15, lw=0)
            ax.plot(depth, curves.signed_mean.numpy(), color=line.get_color(), ls="--", lw=0.8)
        ax.plot([], [], color="0.3", ls="--", lw=0.8, label="signed mean DiD")
        lo, hi = traj.window
        ax.axvspan(lo, hi, color="0.92", zorder=0, label="dip window")
        bottom = min(ax.get_ylim()[0], -0.1)
        ax.axhspan(bottom, 0.0, color="tab:red", alpha=0.08, zorder=0, label="wrong side")
        ax.set_ylim(bottom=bottom)
        ax.axhline(0.0, color="0.3", lw=0.8)
        ax.set_xlabel("relative depth ℓ/L", **label)
        ax.set_ylabel("sign(DiD(L))·DiD(ℓ), mean & IQR", **label)
        ax.set_title(panel_title(lens, len(traj.pairs), model, pairs), **title)
        if fontsize is not None:
            ax.tick_params(labelsize=fontsize - 1)
        if not stacked:
            ax.legend(fontsize=legend_size)
    if stacked:
        fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside lower center", ncol=2, fontsize=legend_size)
    else:
        fig.tight_layout()
    return fig


def lens_comparison_figure(by_lens: Mapping[str, Trajectories]) -> Figure:
    """Two panels, one line per lens, against relative depth: the mean DiD over all items, and the mean
    output-aligned DiD ``sign(DiD(L))·DiD(ℓ)`` (below zero: the mean item prefers the answer it will reject)."""
    fig, (raw_ax, aligned_ax) = plt.subplots(1, 2, figsize=(10.4, 3.8))
    for lens, traj in by_lens.items():
        depth = (traj.did.new_tensor(range(1, traj.num_layers + 1)) / traj.num_layers).numpy()
        sign = torch.where(traj.did[:, -1:] > 0, 1.0, -1.0)
        raw_ax.plot(depth, traj.did.mean(0).numpy(), marker=".", label=lens)
        aligned_ax.plot(depth, (sign * traj.did).mean(0).numpy(), marker=".", label=lens)
    lo, hi = next(iter(by_lens.values())).window
    for ax, title in ((raw_ax, "mean DiD(ℓ)"), (aligned_ax, "mean sign(DiD(L))·DiD(ℓ)")):
        ax.axvspan(lo, hi, color="0.92", zorder=0)
        ax.axhline(0.0, color="0.3", lw=0.8)
        ax.set_xlabel("relative depth ℓ/L")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Save ``fig`` as PNG and close it."""
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
