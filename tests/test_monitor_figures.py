"""The monitor's TensorBoard figures are readable at card size: every axis label fits beside or below its panel
and every title fits the figure width (measured with matplotlib's own renderer)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest
import torch

from dipreg.callbacks.figures import history_figure, trajectory_figure
from dipreg.stimuli import load_pairs
from dipreg.trajectory import Trajectories


def trajectories() -> dict[str, Trajectories]:
    pairs = load_pairs("comp_strict")
    torch.manual_seed(0)
    margins = {name: torch.randn(len(pairs), 30).cumsum(1) for name in ("a", "b")}
    traj = Trajectories(pairs=pairs, lens="logit", margin_a=margins["a"], margin_b=margins["b"])
    return {"logit": traj, "causal": traj}


def history() -> list[dict[str, float]]:
    return [
        {"step": float(s), "dip/logit/accuracy": 0.7, "dip/logit/max_wrong_dip": 0.5, "dip/causal/max_wrong_dip": 0.2}
        for s in (0, 15, 30)
    ]


@pytest.mark.parametrize(
    "make", [lambda: trajectory_figure(trajectories()), lambda: history_figure(history(), ["logit", "causal"])]
)
def test_every_label_fits_its_panel_and_every_title_the_figure(make):
    fig = make()
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    width = fig.get_window_extent(renderer).width
    for ax in fig.axes:
        box = ax.get_window_extent(renderer)
        if ax.get_ylabel():
            assert ax.yaxis.label.get_window_extent(renderer).height <= box.height, ax.get_ylabel()
        if ax.get_xlabel():
            assert ax.xaxis.label.get_window_extent(renderer).width <= box.width, ax.get_xlabel()
        assert ax.title.get_window_extent(renderer).width <= width, ax.get_title()
    plt.close(fig)


def test_trajectory_panels_say_what_the_curve_and_the_band_are():
    fig = trajectory_figure(trajectories())
    assert [ax.get_ylabel() for ax in fig.axes] == ["sign(DiD(L))·DiD(ℓ)"] * 2
    assert [ax.get_title() for ax in fig.axes] == [
        f"{lens} lens · n=25 · mean, IQR band" for lens in ("logit", "causal")
    ]
    plt.close(fig)
