"""Item-level statistics of degradation outcomes, built on ``scipy.stats`` (never re-implemented here).

Flips, tertile flip rates, Mann–Whitney U with rank-biserial correlation, Spearman ρ, exact McNemar and paired
t, and :func:`operator_result`, the whole record of one degraded run (shared by `dipreg degrade` and the
retention callback). Degenerate inputs (no flips, no survivors, constant predictor) give NaN plus a note, never an
exception.
statsmodels is not installed, so the exact McNemar test is ``scipy.stats.binomtest`` on the discordant pairs
(what statsmodels' ``mcnemar(exact=True)`` computes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

if TYPE_CHECKING:
    from dipreg.trajectory import Trajectories

NAN = float("nan")


def _bool(x: ArrayLike) -> np.ndarray:
    return np.asarray(x, dtype=bool).reshape(-1)


def flips(intact_correct: ArrayLike, degraded_correct: ArrayLike) -> np.ndarray:
    """Items correct on the intact model and wrong after degradation."""
    a, b = _bool(intact_correct), _bool(degraded_correct)
    if a.shape != b.shape:
        raise ValueError(f"intact ({a.shape[0]}) and degraded ({b.shape[0]}) item counts differ.")
    return a & ~b


def tertiles(values: ArrayLike) -> np.ndarray:
    """Tertile of each value (0 low, 1 middle, 2 high) from the 1/3 and 2/3 quantiles (linear interpolation).

    Low: ``x ≤ q(1/3)``; high: ``x > q(2/3)``. Tied values always share a tertile, so with many ties (e.g. many
    zero dips) a tertile can hold more or fewer than a third of the items; ``stratify`` reports the counts.
    """
    x = np.asarray(values, dtype=float).reshape(-1)
    if len(x) == 0:
        return np.zeros(0, dtype=int)
    lo, hi = np.quantile(x, [1 / 3, 2 / 3])
    return np.where(x <= lo, 0, np.where(x > hi, 2, 1))


def mann_whitney(dying: ArrayLike, surviving: ArrayLike) -> dict[str, Any]:
    """Two-sided Mann–Whitney U of the predictor in dying vs surviving items, with rank-biserial correlation.

    ``rank_biserial = 2·U/(n_dying·n_surviving) − 1`` with ``U`` the statistic of the dying group: positive
    when dying items have larger values.
    """
    d, s = np.asarray(dying, dtype=float), np.asarray(surviving, dtype=float)
    out: dict[str, Any] = {"u": NAN, "p": NAN, "rank_biserial": NAN, "notes": []}
    if len(d) == 0 or len(s) == 0:
        out["notes"].append(f"Mann–Whitney undefined: {len(d)} dying and {len(s)} surviving items.")
        return out
    res = stats.mannwhitneyu(d, s, alternative="two-sided")
    out.update(
        u=float(res.statistic), p=float(res.pvalue), rank_biserial=2 * float(res.statistic) / (len(d) * len(s)) - 1
    )
    if np.unique(np.concatenate([d, s])).size == 1:
        out["notes"].append("all predictor values tie: Mann–Whitney carries no information.")
    return out


def spearman(x: ArrayLike, y: ArrayLike) -> dict[str, Any]:
    """Spearman ρ and its two-sided p; NaN with a note when either input is constant."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(a) < 3 or np.unique(a).size < 2 or np.unique(b).size < 2:
        return {"rho": NAN, "p": NAN, "notes": ["Spearman undefined: fewer than 3 items or a constant input."]}
    res = stats.spearmanr(a, b)
    return {"rho": float(res.statistic), "p": float(res.pvalue), "notes": []}


def mcnemar_exact(correct_a: ArrayLike, correct_b: ArrayLike) -> dict[str, Any]:
    """Exact McNemar test between two paired arms: two-sided binomial test on the discordant pairs.

    ``b`` = correct in A only, ``c`` = correct in B only. With no discordant pair, p = 1 (no evidence of a
    difference) and a note.
    """
    a, b_ = _bool(correct_a), _bool(correct_b)
    if a.shape != b_.shape:
        raise ValueError(f"McNemar needs paired items: {a.shape[0]} vs {b_.shape[0]}.")
    b, c = int((a & ~b_).sum()), int((~a & b_).sum())
    if b + c == 0:
        return {"b": 0, "c": 0, "p": 1.0, "notes": ["no discordant pairs: the arms agree on every item."]}
    return {"b": b, "c": c, "p": float(stats.binomtest(b, b + c, 0.5).pvalue), "notes": []}


def paired_t(x: ArrayLike, y: ArrayLike) -> dict[str, Any]:
    """Paired t-test (``scipy.stats.ttest_rel``) of ``x`` vs ``y``; NaN with a note when all differences tie."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired t needs paired items: {a.shape} vs {b.shape}.")
    diff = a - b
    if len(diff) < 2 or np.all(diff == diff[0]):
        note = "paired t undefined: fewer than 2 items or every difference is equal."
        return {"t": NAN, "p": NAN, "mean_diff": float(diff.mean()) if len(diff) else NAN, "notes": [note]}
    res = stats.ttest_rel(a, b)
    return {"t": float(res.statistic), "p": float(res.pvalue), "mean_diff": float(diff.mean()), "notes": []}


def _rate(mask: np.ndarray, flip: np.ndarray) -> float:
    return float(flip[mask].mean()) if mask.any() else NAN


def stratify(predictor: ArrayLike, intact_correct: ArrayLike, degraded_correct: ArrayLike) -> dict[str, Any]:
    """How well an intact-model predictor (dip or margin) separates the items that flip.

    Only items correct on the intact model can flip, so every statistic is over those ("at risk"): flip rates
    in the low and high tertile of the predictor, their ratio, the predictor mean of dying vs surviving items,
    Mann–Whitney U with rank-biserial correlation, and Spearman ρ between predictor and flip (0/1).
    """
    x = np.asarray(predictor, dtype=float).reshape(-1)
    flip = flips(intact_correct, degraded_correct)
    if x.shape != flip.shape:
        raise ValueError(f"predictor has {x.shape[0]} items, outcomes have {flip.shape[0]}.")
    risk = _bool(intact_correct)
    xr, fr = x[risk], flip[risk]
    notes: list[str] = []
    out: dict[str, Any] = {"n_at_risk": int(risk.sum()), "n_flips": int(fr.sum())}
    if out["n_at_risk"] == 0:
        notes.append("no item is correct on the intact model: nothing can flip.")
    elif out["n_flips"] == 0:
        notes.append("no flips: flip stratification is undefined.")
    tert = tertiles(xr)
    low, high = _rate(tert == 0, fr), _rate(tert == 2, fr)
    ratio = high / low if low > 0 else NAN
    if low == 0 and high > 0:
        notes.append("no low-tertile flips: the high/low ratio is unbounded (reported as NaN).")
    mw = mann_whitney(xr[fr], xr[~fr])
    sp = spearman(xr, fr.astype(float))
    out.update(
        flip_rate=float(fr.mean()) if len(fr) else NAN,
        low_tertile_flip_rate=low,
        high_tertile_flip_rate=high,
        high_low_ratio=ratio,
        n_low=int((tert == 0).sum()),
        n_high=int((tert == 2).sum()),
        mean_dying=float(xr[fr].mean()) if fr.any() else NAN,
        mean_surviving=float(xr[~fr].mean()) if (~fr).any() else NAN,
        mw_u=mw["u"],
        mw_p=mw["p"],
        rank_biserial=mw["rank_biserial"],
        spearman_rho=sp["rho"],
        spearman_p=sp["p"],
        notes=list(dict.fromkeys(notes + mw["notes"] + sp["notes"])),
    )
    return out


#: Significance level of the Mann–Whitney test behind :func:`death_carrier`.
CARRIER_ALPHA = 0.05


def death_carrier(stratification: dict[str, dict[str, Any]], alpha: float = CARRIER_ALPHA) -> dict[str, Any]:
    """Which intact-model predictor carries an operator's deaths: the one whose two-sided Mann–Whitney test
    (dying vs surviving items, :func:`stratify`) has ``p < alpha``.

    ``carrier`` is ``"dip"`` or ``"margin"`` when only that predictor separates the dying items, ``"both"``,
    ``"neither"`` (no ``p < alpha``), or ``"undefined"`` when neither test could run (no flips, no survivors);
    ``line`` says it in words with each predictor's rank-biserial (sign: positive when dying items have the larger
    value) and p.
    """
    significant = [name for name in ("dip", "margin") if stratification[name]["mw_p"] < alpha]  # NaN is never <
    defined = [name for name in ("dip", "margin") if np.isfinite(stratification[name]["mw_p"])]
    if not defined:
        carrier = "undefined"
    elif len(significant) == 2:
        carrier = "both"
    else:
        carrier = significant[0] if significant else "neither"

    def effect(name: str) -> str:
        res = stratification[name]
        if not np.isfinite(res["mw_p"]):
            return f"{name} untestable"
        side = "larger" if res["rank_biserial"] > 0 else "smaller"
        return f"{name} r={res['rank_biserial']:+.2f} p={res['mw_p']:.2g} (dying items have the {side} {name})"

    verdicts = {
        "dip": "the dip carries the deaths",
        "margin": "the intact margin carries the deaths",
        "both": "both predictors carry the deaths",
        "neither": f"neither predictor separates the deaths at p<{alpha}",
        "undefined": "no test possible (no flips or no survivors)",
    }
    return {"carrier": carrier, "alpha": alpha, "line": f"{verdicts[carrier]}: {effect('dip')}; {effect('margin')}"}


def operator_result(intact: Trajectories, degraded: Trajectories) -> dict[str, Any]:
    """Accuracy, flips, McNemar, paired t on DiD(L), dip / margin stratification of one degraded run, and which of
    the two predictors carries its deaths (:func:`death_carrier`)."""
    dip = intact.max_wrong_dip.numpy()
    margin = intact.did[:, -1].abs().numpy()
    before, after = intact.correct.numpy(), degraded.correct.numpy()
    flip = flips(before, after)
    stratification = {"dip": stratify(dip, before, after), "margin": stratify(margin, before, after)}
    return {
        "accuracy": float(after.mean()),
        "strict_accuracy": float(degraded.strict_correct.float().mean()),
        "n_flips": int(flip.sum()),
        "n_rescued": int((~before & after).sum()),
        "mcnemar": mcnemar_exact(before, after),
        "final_did_paired_t": paired_t(intact.did[:, -1].numpy(), degraded.did[:, -1].numpy()),
        "stratification": stratification,
        "carrier": death_carrier(stratification),
        "items": {"correct": after.tolist(), "final_did": degraded.did[:, -1].tolist(), "flip": flip.tolist()},
    }
