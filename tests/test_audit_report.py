"""The audit's report: answer shares per subset, the degenerate-model warning and JSON field, the prompt-style line,
and the output-aligned curves of the trajectory figure, on hand-built trajectories (no model)."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import assert_png_of
from rich.console import Console

import dipreg.audit as audit_module
from dipreg.plots import aligned_curves, family_trajectory_figure, save_figure
from dipreg.stimuli import MinimalPair
from dipreg.trajectory import DEGENERATE_SHARE, Trajectories


def make_pairs(families: list[str]) -> list[MinimalPair]:
    return [
        MinimalPair(
            id=f"p{i}",
            ctx_a=f"context a {i}",
            ctx_b=f"context b {i}",
            t_pos=" Yes",
            t_neg=" No",
            family=family,
            safety=i % 2 == 0,
        )
        for i, family in enumerate(families)
    ]


# Last-layer margins per item (a, b). Degenerate: every context answers t_neg, yet DiD(L) > 0 for items 0, 1, 3.
DEGENERATE_LAST = [(-1.0, -3.0), (-0.5, -2.0), (-4.0, -1.0), (-0.2, -0.3)]
# Healthy: mostly strictly correct, one item answers t_pos twice, one context ties (counted in neither share).
HEALTHY_LAST = [(2.0, -1.0), (1.5, -0.5), (0.7, 0.4), (3.0, 0.0)]
FAMILIES = ["negation", "negation", "value_flip", "value_flip"]


def make_trajectories(last: list[tuple[float, float]], num_layers: int = 5) -> Trajectories:
    """Margins ramp linearly from a small offset at layer 1 to the given last-layer values."""
    ramp = torch.linspace(0.2, 1.0, num_layers, dtype=torch.float64)
    margin_a = torch.stack([a * ramp for a, _ in last])
    margin_b = torch.stack([b * ramp for _, b in last])
    return Trajectories(pairs=make_pairs(FAMILIES), lens="logit", margin_a=margin_a, margin_b=margin_b)


def plain_shares(last: list[tuple[float, float]]) -> tuple[float, float]:
    """Reference: share of the 2n last-layer margins > 0 and < 0, in plain Python."""
    values = [m for pair in last for m in pair]
    return sum(v > 0 for v in values) / len(values), sum(v < 0 for v in values) / len(values)


@pytest.mark.parametrize("last", [DEGENERATE_LAST, HEALTHY_LAST])
def test_answer_shares_per_subset_match_plain_python(last):
    summary = make_trajectories(last).summary()
    assert (summary["all"]["answer_pos_share"], summary["all"]["answer_neg_share"]) == pytest.approx(plain_shares(last))
    for family in set(FAMILIES):
        subset = [m for m, f in zip(last, FAMILIES, strict=True) if f == family]
        stats = summary["families"][family]
        assert (stats["answer_pos_share"], stats["answer_neg_share"]) == pytest.approx(plain_shares(subset))
    safety = [m for i, m in enumerate(last) if i % 2 == 0]
    assert (summary["safety"]["answer_pos_share"], summary["safety"]["answer_neg_share"]) == pytest.approx(
        plain_shares(safety)
    )


def test_healthy_fixture_shares_leave_out_the_tie():
    stats = make_trajectories(HEALTHY_LAST).summary()["all"]
    assert stats["answer_pos_share"] == pytest.approx(5 / 8)
    assert stats["answer_neg_share"] == pytest.approx(2 / 8)


def run_fake_audit(monkeypatch, tmp_path, last: list[tuple[float, float]], prompt: str = "auto"):
    traj = make_trajectories(last)
    monkeypatch.setattr(audit_module, "load_pairs", lambda name: traj.pairs)
    monkeypatch.setattr(audit_module, "load_model", lambda name: (None, SimpleNamespace(chat_template=None)))
    monkeypatch.setattr(audit_module, "trajectories_by_lens", lambda *args, **kwargs: {"logit": traj})
    console = Console(file=io.StringIO(), width=400, force_terminal=False)
    payload = audit_module.run_audit(None, "core", ["logit"], tmp_path / "audit", prompt=prompt, console=console)
    return payload, console.file.getvalue(), traj


def test_degenerate_model_is_warned_about_and_recorded(monkeypatch, tmp_path):
    payload, printed, traj = run_fake_audit(monkeypatch, tmp_path, DEGENERATE_LAST)
    # the fixture is what the issue describes: accuracy looks fine, strict accuracy is 0
    assert float(traj.correct.float().mean()) == pytest.approx(0.75)
    assert float(traj.strict_correct.float().mean()) == 0.0
    written = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert written["degenerate"] == {"lens": "logit", "side": "t_neg", "share": pytest.approx(1.0)}
    assert payload["degenerate"] == written["degenerate"]
    assert written["lenses"]["logit"]["degenerate"] == {"side": "t_neg", "share": pytest.approx(1.0)}
    warnings = [line for line in printed.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    assert "logit lens" in warnings[0] and "t_neg" in warnings[0] and "100.0%" in warnings[0]
    assert "strict accuracy is the honest number" in warnings[0]
    assert "prompt style: auto → raw" in printed
    # the table shows strict accuracy next to accuracy, then both shares (two-line headers)
    lines = printed.splitlines()
    top = next(i for i, line in enumerate(lines) if "strict" in line)
    assert lines[top].split()[:3] == ["strict", "answers", "answers"]
    assert lines[top + 1].split()[:6] == ["subset", "n", "acc", "acc", "t_pos", "t_neg"]
    all_row = next(line.split() for line in lines if line.split()[:1] == ["all"])
    # n, accuracy, strict accuracy, t_pos share, t_neg share, by hand: 3 of 4 DiD(L) > 0, 0 strict, 0/8, 8/8
    assert all_row[1:6] == ["4", "0.750", "0.000", "0.000", "1.000"]


def test_healthy_model_gets_no_warning(monkeypatch, tmp_path):
    payload, printed, _ = run_fake_audit(monkeypatch, tmp_path, HEALTHY_LAST, prompt="raw")
    assert payload["degenerate"] is None
    assert json.loads((tmp_path / "audit" / "audit.json").read_text())["degenerate"] is None
    assert "warning" not in printed
    assert "prompt style: raw;" in printed


def test_degenerate_threshold_is_inclusive_at_the_constant():
    # 20 pairs, 38 of 40 contexts negative = 0.95 exactly; the 39-of-40 case is above it, 37 below.
    for negatives, expected in ((37, None), (38, "t_neg"), (39, "t_neg")):
        lasts = [-1.0] * negatives + [1.0] * (40 - negatives)
        pairs = list(zip(lasts[0::2], lasts[1::2], strict=True))
        margin_a = torch.tensor([[0.0, a] for a, _ in pairs])
        margin_b = torch.tensor([[0.0, b] for _, b in pairs])
        traj = Trajectories(pairs=make_pairs(["f"] * 20), lens="logit", margin_a=margin_a, margin_b=margin_b)
        found = audit_module.degenerate_answer(traj.summary()["all"])
        assert (found and found["side"]) == expected, negatives
    assert DEGENERATE_SHARE == 0.95


def mirror_trajectories(num_layers: int = 8) -> Trajectories:
    """Two items whose DiD trajectories are mirror images: a deep dip, then an output of opposite sign."""
    depth = np.arange(1, num_layers + 1) / num_layers
    shape = np.where(depth < 0.9, -2.0 * np.sin(np.pi * depth), 1.0)  # wrong side mid-depth, right at the end
    did = torch.tensor(np.stack([shape, -shape]))
    pairs = make_pairs(["value_flip", "value_flip"])
    return Trajectories(pairs=pairs, lens="logit", margin_a=did, margin_b=torch.zeros_like(did))


def test_aligned_curves_do_not_cancel_mirror_images():
    traj = mirror_trajectories()
    curves = aligned_curves(traj.did)
    did = traj.did.numpy()
    # reference by hand: align each row by the sign of its last entry, then mean and quartiles across rows
    aligned = np.array([row * np.sign(row[-1]) for row in did])
    np.testing.assert_allclose(curves.mean.numpy(), aligned.mean(0))
    np.testing.assert_allclose(curves.q25.numpy(), np.percentile(aligned, 25, axis=0))
    np.testing.assert_allclose(curves.q75.numpy(), np.percentile(aligned, 75, axis=0))
    np.testing.assert_allclose(curves.signed_mean.numpy(), 0.0, atol=1e-12)
    assert curves.mean.abs().max() > 1.0  # the dip is large, not cancelled
    assert float(curves.mean.min()) == pytest.approx(-float(traj.max_wrong_dip.max()))


def test_aligned_curves_leave_out_non_finite_items_and_select_rows():
    did = torch.tensor([[1.0, -2.0, 3.0], [float("nan"), 1.0, 1.0], [0.5, 0.5, -1.0]], dtype=torch.float64)
    np.testing.assert_allclose(aligned_curves(did).mean.numpy(), [(1.0 - 0.5) / 2, (-2.0 - 0.5) / 2, 2.0])
    np.testing.assert_allclose(aligned_curves(did, [2]).mean.numpy(), [-0.5, -0.5, 1.0])


def test_trajectory_figure_titles_name_model_pairs_lens_and_n(tmp_path):
    traj = mirror_trajectories()
    fig = family_trajectory_figure({"logit": traj}, model="org/model", pairs="core")
    assert fig.axes[0].get_title() == "org/model · core\nlogit lens · n=2"
    plain = family_trajectory_figure({"logit": traj}, stacked=True, fontsize=12, dpi=100)
    assert plain.axes[0].get_title() == "logit lens · n=2"
    save_figure(fig, tmp_path / "a.png")
    save_figure(plain, tmp_path / "b.png")
    assert_png_of(tmp_path / "a.png", fig)
    assert_png_of(tmp_path / "b.png", plain)


def test_aligned_band_is_the_inter_quartile_range_across_items():
    rows = np.random.default_rng(0).normal(size=(7, 6))
    curves = aligned_curves(torch.tensor(rows))
    aligned = rows * np.sign(rows[:, -1:])
    np.testing.assert_allclose(curves.q25.numpy(), np.percentile(aligned, 25, axis=0))
    np.testing.assert_allclose(curves.q75.numpy(), np.percentile(aligned, 75, axis=0))
    np.testing.assert_allclose(curves.signed_mean.numpy(), rows.mean(0))
