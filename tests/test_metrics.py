"""max_wrong_dip, commit_layer_frac and the correctness rules on hand-made DiD vectors."""

import pytest
import torch

from dipreg import metrics


def did(*values: float) -> torch.Tensor:
    return torch.tensor([values], dtype=torch.float64)


# 10 layers: relative depths 0.1 .. 1.0; the default window [0.25, 0.90] holds layers 3..9.


def test_no_disagreement_gives_zero_dip_and_zero_commit():
    d = did(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    assert metrics.max_wrong_dip(d).item() == 0.0
    assert metrics.commit_layer_frac(d).item() == 0.0


def test_dip_is_the_deepest_wrong_excursion_inside_the_window():
    d = did(0.1, 0.2, -0.5, -1.5, -0.7, 0.1, 0.2, 0.3, 0.4, 2.0)
    assert metrics.max_wrong_dip(d).item() == pytest.approx(1.5)
    assert metrics.commit_layer_frac(d).item() == pytest.approx(0.5)


def test_disagreement_only_outside_the_window_has_no_dip_but_a_commit():
    # wrong at layers 1-2 (depth 0.1, 0.2), outside [0.25, 0.90]
    d = did(-3.0, -2.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 1.0)
    assert metrics.max_wrong_dip(d).item() == 0.0
    assert metrics.commit_layer_frac(d).item() == pytest.approx(0.2)


def test_negative_output_flips_the_wrong_side():
    # output decision is negative: positive excursions are the wrong side
    d = did(0.0, 0.0, 0.8, 0.2, -0.1, -0.2, -0.3, -0.4, -0.5, -1.0)
    assert metrics.max_wrong_dip(d).item() == pytest.approx(0.8)
    assert metrics.pair_correct(d).item() is False


def test_exact_zeros_count_as_disagreement_for_commit_but_not_as_dip():
    d = did(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.0, 0.8, 0.9, 1.0)
    assert metrics.max_wrong_dip(d).item() == 0.0
    assert metrics.commit_layer_frac(d).item() == pytest.approx(0.7)


def test_exact_zero_output_is_not_correct_and_has_no_dip():
    d = did(0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.7, -0.8, 0.9, 0.0)
    assert metrics.max_wrong_dip(d).item() == 0.0
    assert metrics.pair_correct(d).item() is False
    assert metrics.commit_layer_frac(d).item() == pytest.approx(0.9)


def test_window_is_configurable_and_inclusive():
    d = did(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, -0.9, 1.0)
    assert metrics.max_wrong_dip(d, window=(0.25, 0.90)).item() == pytest.approx(0.9)
    assert metrics.max_wrong_dip(d, window=(0.25, 0.80)).item() == 0.0


def test_batched_statistics_are_per_row():
    d = torch.cat([did(0.1, 0.2, -0.5, -1.5, -0.7, 0.1, 0.2, 0.3, 0.4, 2.0), did(*[1.0] * 10)])
    assert metrics.max_wrong_dip(d).tolist() == pytest.approx([1.5, 0.0])
    assert metrics.commit_layer_frac(d).tolist() == pytest.approx([0.5, 0.0])


def test_strict_correct_needs_both_margins_on_their_side():
    a = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    b = torch.tensor([[0.0, -1.0], [0.0, 0.5]])
    assert metrics.strict_correct(a, b).tolist() == [True, False]
    assert metrics.pair_correct(a - b).tolist() == [True, True]


@pytest.mark.parametrize("window", [(0.5, 0.2), (-0.1, 0.5), (0.2, 1.5), (0.3,)])
def test_bad_window_is_rejected_with_a_clear_error(window):
    with pytest.raises(ValueError, match="window"):
        metrics.validate_window(window)


def test_a_non_finite_trajectory_has_nan_dip_and_commit_not_zero():
    d = torch.cat(
        [
            did(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, float("nan")),
            did(float("inf"), 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),  # non-finite outside the window
            did(0.1, 0.2, -0.5, -1.5, -0.7, 0.1, 0.2, 0.3, 0.4, 2.0),
        ]
    )
    dips, commits = metrics.max_wrong_dip(d), metrics.commit_layer_frac(d)
    assert torch.isnan(dips[:2]).all() and torch.isnan(commits[:2]).all()
    assert dips[2].item() == pytest.approx(1.5) and commits[2].item() == pytest.approx(0.5)
    assert metrics.pair_correct(d).tolist() == [False, True, True]


def test_an_all_zero_trajectory_is_flagged_and_its_tie_dip_is_plus_zero():
    d = torch.cat([did(*[0.0] * 10), did(*[1.0] * 10), did(*[float("nan")] * 10), did(*[0.0] * 9, 1.0)])
    non_finite, all_zero = metrics.unreadable_items(d)
    assert non_finite.tolist() == [False, False, True, False]
    assert all_zero.tolist() == [True, False, False, False]
    dip = metrics.max_wrong_dip(d[:1])
    assert dip.item() == 0.0 and not torch.signbit(dip).item()  # never -0.0


def test_aligned_did_multiplies_each_row_by_the_sign_of_its_last_entry():
    rows = [[0.5, -1.0, 2.0], [0.5, -1.0, -2.0], [1.0, 3.0, 0.0]]
    expected = [[v * ((r[-1] > 0) - (r[-1] < 0)) for v in r] for r in rows]  # plain-Python sign
    got = metrics.aligned_did(torch.tensor(rows, dtype=torch.float64))
    assert got.tolist() == expected
    # the dip is the deepest negative aligned value inside the window, for every row with a decided output
    d = did(0.1, 0.2, 0.8, 0.2, -0.1, -0.2, -0.3, -0.4, -0.5, -1.0)
    assert -metrics.aligned_did(d)[0, 2:9].min().item() == pytest.approx(metrics.max_wrong_dip(d).item())
