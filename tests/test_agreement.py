"""Lens agreement (dipreg.agreement) on hand-built trajectories, and DipMonitor's agreement scalars and its
end-of-fit probe read back from TensorBoard."""

from __future__ import annotations

import json
import math

import pytest
import torch
from scipy import stats
from test_callbacks import UserLoRAModule, read_events, token_batches, trainer

import dipreg
from dipreg.agreement import item_agreement, summarise_agreement
from dipreg.callbacks import DipMonitor

NAN = math.nan


def _traj(window_values: list[float], outside: float = 0.0) -> list[float]:
    """A 10-layer trajectory: layers 3..8 (1-based; the window 0.30-0.85) hold ``window_values``."""
    return [outside, outside, *window_values, outside, outside]


def test_agreement_on_hand_built_trajectories():
    logit = torch.tensor(
        [
            _traj([1, 2, 3, 4, 5, 6], outside=100.0),  # garbage outside the window must not count
            _traj([1, 2, 3, 4, 5, 6]),
            _traj([1, -1, 1, -1, 1, -1]),
            _traj([1, 2, 2, 3, 4, 5]),
            [NAN, *_traj([1, 2, 3, 4, 5, 6])[1:]],
        ]
    )
    causal = torch.tensor(
        [
            _traj([10, 20, 30, 40, 50, 60], outside=-100.0),
            _traj([3, 2, 1, -1, -2, -3]),
            _traj([2, 2, 2, 2, 2, 2]),
            _traj([1, 3, 2, 4, 5, 6]),
            _traj([1, 2, 3, 4, 5, 6]),
        ]
    )
    rho, sign = item_agreement(logit, causal, (0.30, 0.85))
    # ρ by hand. Item 4 has a tie: ranks (1, 2.5, 2.5, 4, 5, 6) vs (1, 3, 2, 4, 5, 6) -> 17 / sqrt(17 · 17.5)
    expected_rho = [1.0, -1.0, NAN, math.sqrt(17 / 17.5), NAN]
    expected_sign = [1.0, 0.5, 0.5, 1.0, NAN]
    for got, want in zip(rho, expected_rho, strict=True):
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, abs=1e-12)
    for got, want in zip(sign, expected_sign, strict=True):
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, abs=1e-12)
    summary = summarise_agreement(rho, sign)
    assert summary.spearman == pytest.approx((1.0 - 1.0 + math.sqrt(17 / 17.5)) / 3) and summary.n_spearman == 3
    assert summary.sign == pytest.approx(3.0 / 4) and summary.n_sign == 4


def test_agreement_rejects_mismatched_shapes_and_handles_no_defined_item():
    with pytest.raises(ValueError, match="shapes differ"):
        item_agreement(torch.zeros(2, 10), torch.zeros(3, 10))
    summary = summarise_agreement([NAN], [NAN])
    assert math.isnan(summary.spearman) and summary.n_spearman == 0 and summary.n_sign == 0


@pytest.mark.parametrize(("max_steps", "steps"), [(5, [0, 2, 4, 5]), (4, [0, 2, 4])])
def test_monitor_probes_the_final_weights_once_and_logs_agreement(
    tmp_path, tiny_tokenizer, tiny_pairs, max_steps, steps
):
    monitor = DipMonitor(tiny_pairs, every_n_steps=2, lenses=("logit", "causal"), log_figures=False, causal_every=2)
    module = UserLoRAModule(tiny_tokenizer, lr=0.5)
    trainer(tmp_path, max_steps, [monitor], enable_checkpointing=False).fit(module, token_batches())
    events = read_events(tmp_path / "tb" / "version_0")
    assert [e.step for e in events.Scalars("dip/logit/max_wrong_dip")] == steps  # the end probe, never twice
    # the end probe reads every lens even where causal_every would skip the causal lens (index 3 at max_steps=5)
    assert [e.step for e in events.Scalars("dip/causal/max_wrong_dip")] == [s for s in steps if s != 2]
    assert [e.step for e in events.Scalars("dip/agreement/spearman")] == [s for s in steps if s != 2]
    history = json.loads((tmp_path / "tb" / "version_0" / "dip_history.json").read_text())["history"]
    assert [int(h["step"]) for h in history] == steps
    # the last value is the final weights': recompute with scipy on fresh trajectories of the trained model
    lenses = dipreg.trajectories_by_lens(module.net, tiny_tokenizer, tiny_pairs, ["logit", "causal"], prompt="auto")
    mask = slice(1, 7)  # 8 layers: ℓ = 2..7 in the monitor window 0.25-0.90 (DEFAULT_WINDOW)
    rhos = [
        stats.spearmanr(a[mask].numpy(), b[mask].numpy()).statistic
        for a, b in zip(lenses["logit"].did, lenses["causal"].did, strict=True)
    ]
    signs = [
        float((torch.sign(a[mask]) == torch.sign(b[mask])).float().mean())
        for a, b in zip(lenses["logit"].did, lenses["causal"].did, strict=True)
    ]
    assert events.Scalars("dip/agreement/spearman")[-1].value == pytest.approx(
        float(torch.tensor(rhos).nanmean()), abs=1e-5
    )
    assert events.Scalars("dip/agreement/sign")[-1].value == pytest.approx(sum(signs) / len(signs), abs=1e-5)
    assert history[-1]["dip/agreement/sign"] == pytest.approx(sum(signs) / len(signs), abs=1e-6)
