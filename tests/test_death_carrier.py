"""Which intact-model predictor carries an operator's deaths: the verdict rule against scipy's Mann–Whitney on the same
items, every outcome of the rule, and the side-by-side table of `dipreg degrade`."""

import io

import numpy as np
import pytest
from rich.console import Console
from scipy import stats as scipy_stats

from dipreg.eval.degradation.report import predictor_table
from dipreg.eval.stats import death_carrier, stratify

N = 60


def outcome(dip: np.ndarray, margin: np.ndarray, dies: np.ndarray) -> dict:
    """Stratification of both predictors when every item is correct intact and ``dies`` flip."""
    intact, degraded = np.ones(N, bool), ~dies
    return {"dip": stratify(dip, intact, degraded), "margin": stratify(margin, intact, degraded)}


def scipy_p(values: np.ndarray, dies: np.ndarray) -> float:
    return float(scipy_stats.mannwhitneyu(values[dies], values[~dies], alternative="two-sided").pvalue)


rng = np.random.default_rng(0)
NOISE = rng.permutation(N).astype(float)  # unrelated to who dies
DIES = np.zeros(N, bool)
DIES[::3] = True  # every third item dies
RANK = np.where(DIES, 100.0, 0.0) + rng.permutation(N)  # dying items have the larger value


@pytest.mark.parametrize(
    ("dip", "margin", "carrier"),
    [
        (RANK, NOISE, "dip"),
        (NOISE, -RANK, "margin"),  # dying items have the smaller margin, as the paper says of quantization
        (RANK, -RANK, "both"),
        (NOISE, NOISE[::-1].copy(), "neither"),
    ],
)
def test_the_verdict_follows_scipys_mann_whitney_at_005(dip, margin, carrier):
    result = death_carrier(outcome(dip, margin, DIES))
    assert result["carrier"] == carrier and result["alpha"] == 0.05
    significant = {name for name, x in (("dip", dip), ("margin", margin)) if scipy_p(x, DIES) < 0.05}
    assert significant == {"dip": {"dip"}, "margin": {"margin"}, "both": {"dip", "margin"}, "neither": set()}[carrier]
    if carrier == "margin":
        assert "margin r=-1.00" in result["line"] and "dying items have the smaller margin" in result["line"]
        assert result["line"].startswith("the intact margin carries the deaths:")


def test_without_flips_the_verdict_is_undefined():
    result = death_carrier(outcome(RANK, NOISE, np.zeros(N, bool)))
    assert result["carrier"] == "undefined"
    assert "dip untestable" in result["line"] and "margin untestable" in result["line"]


def test_the_table_puts_both_predictors_and_the_verdict_in_one_row_per_operator():
    results = {}
    for label, (dip, margin) in {"gptq:bits=3": (NOISE, -RANK), "late_drop": (RANK, NOISE)}.items():
        strat = outcome(dip, margin, DIES)
        results[label] = {"n_flips": int(DIES.sum()), "stratification": strat, "carrier": death_carrier(strat)}
    table = predictor_table(results)
    columns = {column.header: list(column.cells) for column in table.columns}
    assert columns["operator"] == ["gptq:bits=3", "late_drop"]
    assert columns["carrier"] == ["margin", "dip"]
    assert columns["marg r"] == ["-1.00", "+0.02"] and columns["dip r"] == ["+0.02", "+1.00"]
    assert columns["flips"] == ["20", "20"]
    Console(width=200, file=io.StringIO()).print(table)  # renders
