"""dipreg.eval.stats against hand-computed values on small fixtures, and NaN-with-a-note on degenerate input."""

import math

import numpy as np
import pytest

from dipreg.eval import stats


def test_flips_are_correct_intact_and_wrong_degraded():
    got = stats.flips([1, 1, 0, 0, 1], [0, 1, 1, 0, 0])
    assert got.tolist() == [True, False, False, False, True]


def test_tertiles_split_at_the_quantiles_and_keep_ties_together():
    assert stats.tertiles([5, 1, 9, 3, 7, 2, 8, 4, 6]).tolist() == [1, 0, 2, 0, 2, 0, 2, 1, 1]
    # q(1/3) = q(2/3) = 0 here: the four tied zeros are all low, every positive value is high
    assert stats.tertiles([0, 0, 0, 0, 1, 2]).tolist() == [0, 0, 0, 0, 2, 2]


def test_stratify_matches_hand_computed_values():
    dip = np.arange(1, 10, dtype=float)  # 1..9, all correct intact, the three largest flip
    intact = np.ones(9, dtype=bool)
    degraded = dip <= 6
    out = stats.stratify(dip, intact, degraded)
    assert out["n_at_risk"] == 9 and out["n_flips"] == 3
    assert out["flip_rate"] == pytest.approx(1 / 3)
    assert out["high_tertile_flip_rate"] == 1.0 and out["low_tertile_flip_rate"] == 0.0
    assert math.isnan(out["high_low_ratio"]) and any("unbounded" in n for n in out["notes"])
    assert out["mean_dying"] == 8.0 and out["mean_surviving"] == 3.5
    # U of the dying group: every one of the 3·6 pairs favours dying -> U = 18, rank-biserial +1,
    # exact two-sided p = 2 / C(9, 3) = 2/84.
    assert out["mw_u"] == 18.0 and out["rank_biserial"] == 1.0
    assert out["mw_p"] == pytest.approx(2 / 84)
    # Spearman: ranks 1..9 vs flip ranks (3.5 ×6, 8 ×3): cov 40.5, var 60 and 40.5 -> sqrt(0.675)
    assert out["spearman_rho"] == pytest.approx(math.sqrt(0.675))


def test_stratify_uses_only_items_correct_on_the_intact_model():
    dip = [9.0, 1.0, 2.0, 3.0]
    out = stats.stratify(dip, [False, True, True, True], [False, True, True, False])
    assert out["n_at_risk"] == 3 and out["n_flips"] == 1
    assert out["mean_dying"] == 3.0 and out["mean_surviving"] == 1.5


def test_mcnemar_exact_is_a_binomial_test_on_discordant_pairs():
    out = stats.mcnemar_exact([1, 1, 1, 1, 0, 0], [0, 0, 0, 1, 0, 1])
    assert (out["b"], out["c"]) == (3, 1)
    assert out["p"] == pytest.approx(10 / 16)  # P(X<=1) + P(X>=3), X ~ Bin(4, 1/2)


def test_paired_t_matches_hand_computation():
    out = stats.paired_t([1, 2, 3, 4], [0, 0, 1, 1])  # d = 1, 2, 2, 3: mean 2, sd sqrt(2/3)
    assert out["mean_diff"] == 2.0
    assert out["t"] == pytest.approx(2 / (math.sqrt(2 / 3) / 2))
    assert 0 < out["p"] < 0.05


def test_degenerate_inputs_give_nan_and_a_note_never_an_exception():
    no_flips = stats.stratify([0.1, 0.2, 0.3], [1, 1, 1], [1, 1, 1])
    assert no_flips["n_flips"] == 0 and math.isnan(no_flips["mw_p"]) and math.isnan(no_flips["spearman_rho"])
    assert any("no flips" in n for n in no_flips["notes"])
    ties = stats.stratify([0.0] * 6, [1] * 6, [1, 0, 1, 0, 1, 1])
    assert math.isnan(ties["spearman_rho"]) and any("tie" in n for n in ties["notes"])
    nobody = stats.stratify([1.0, 2.0], [0, 0], [0, 0])
    assert nobody["n_at_risk"] == 0 and math.isnan(nobody["flip_rate"])
    same = stats.paired_t([1.0, 2.0], [1.0, 2.0])
    assert math.isnan(same["t"]) and same["notes"]
    agree = stats.mcnemar_exact([1, 0], [1, 0])
    assert agree["p"] == 1.0 and agree["notes"]


def test_mismatched_lengths_are_reported():
    with pytest.raises(ValueError, match="item counts differ"):
        stats.flips([1, 0], [1])
    with pytest.raises(ValueError, match="predictor has 3 items"):
        stats.stratify([1.0, 2.0, 3.0], [1, 1], [1, 0])
