"""The statistics of `dipreg arms` (paper §6.2–6.5): arm means over seeds, per-seed McNemar, the monitor forecast.

Input: one record per trained run (``arm``, ``seed``, ``monitor`` history, ``eval``) and the untrained model's
``eval``. Every test is computed per seed and never pooled across seeds (pooling discordant pairs would
overstate the effective sample size, §6.3). Output: JSON-ready dicts; rendering lives in ``arms_report``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from dipreg.eval import stats
from dipreg.eval.arms.plan import HINGE_ARMS

__all__ = [
    "LENS_SHAPED_AGREEMENT_DROP",
    "LENS_SHAPED_DIP_DROP",
    "RETENTION_CONDITION",
    "arm_table",
    "causal_table",
    "forecast",
    "lens_shaped_reasons",
    "lens_shaped_repair",
    "mean_sd",
    "per_seed_mcnemar",
    "retention_table",
]

#: The condition whose accuracy is "retention" in the forecast and the last column of Table 3 (paper: mid-SVD r64).
RETENTION_CONDITION = "mid_svd:rank=64"
REFERENCE_ARM = "output_only"
SATURATION_ACCURACY = 0.95
#: "Lens-shaped repair": a hinge arm whose logit dip is at least this fraction below the reference's ...
LENS_SHAPED_DIP_DROP = 0.25
#: ... while its mean per-item Spearman agreement (logit vs causal lens) is at least this much below the reference's.
LENS_SHAPED_AGREEMENT_DROP = 0.20


def mean_sd(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean, sample standard deviation (NaN for one value) and the values; ``None`` entries are skipped."""
    kept = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not kept:
        return {"mean": math.nan, "sd": math.nan, "n": 0, "values": []}
    sd = float(np.std(kept, ddof=1)) if len(kept) > 1 else math.nan
    return {"mean": float(np.mean(kept)), "sd": sd, "n": len(kept), "values": kept}


def _by_arm(runs: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        out.setdefault(run["arm"], []).append(run)
    return out


def _row(ev: dict[str, Any]) -> dict[str, float | None]:
    logit, causal = ev["summary"]["logit"], ev["summary"]["causal"]
    retention = ev["conditions"].get(RETENTION_CONDITION, {}).get("accuracy")
    agreement = ev.get("agreement") or {}  # absent in eval.json files written before the agreement metric
    return {
        "agreement_spearman": agreement.get("spearman"),
        "agreement_sign": agreement.get("sign"),
        "accuracy": logit["accuracy"],
        "dip": logit["mean_max_wrong_dip"],
        "commit": logit["mean_commit_layer_frac"],
        "causal_dip": causal["mean_max_wrong_dip"],
        "causal_commit": causal["mean_commit_layer_frac"],
        "fragility": ev.get("fragility"),
        "nll": ev.get("nll"),
        "retention": retention,
    }


def _is_hinge_arm(runs: Sequence[dict[str, Any]]) -> bool:
    return any(r.get("recipe") in HINGE_ARMS or r.get("lambda") is not None for r in runs)


def _step_seconds(run: dict[str, Any]) -> float | None:
    return (run.get("train") or {}).get("step_seconds_median")


def arm_table(runs: Sequence[dict[str, Any]], untrained: dict[str, Any]) -> list[dict[str, Any]]:
    """Table 3: per arm (mean ± sd over seeds) accuracy, logit dip, commit, fragility, NLL, retention, the median
    training-step time and its overhead over output_only's (arm mean / output_only mean − 1)."""
    rows = [{"arm": "untrained", **{k: mean_sd([v]) for k, v in _row(untrained).items()}}]
    reference = mean_sd([_step_seconds(r) for r in runs if r["arm"] == REFERENCE_ARM])["mean"]
    for arm, arm_runs in _by_arm(runs).items():
        per_seed = [_row(r["eval"]) for r in arm_runs]
        step = mean_sd([_step_seconds(r) for r in arm_runs])
        overhead = step["mean"] / reference - 1 if reference and not math.isnan(reference) else math.nan
        rows.append(
            {
                "arm": arm,
                **{k: mean_sd([p[k] for p in per_seed]) for k in per_seed[0]},
                "step_seconds": step,
                "step_overhead": overhead,
            }
        )
    return rows


def lens_shaped_repair(arm: dict[str, float], reference: dict[str, float], *, is_hinge: bool = True) -> bool:
    """The "lens-shaped repair" flag: a hinge arm whose mean logit dip is at least :data:`LENS_SHAPED_DIP_DROP`
    (relative) below the reference's while the causal lens does not follow: either its mean per-item Spearman
    agreement between the logit and the causal lens is at least :data:`LENS_SHAPED_AGREEMENT_DROP` (absolute) below
    the reference's (the two lenses stopped telling the same story), or its mean causal dip is not below the
    reference's (the dip the logit lens no longer sees is still there in the computation). ``arm`` and
    ``reference`` hold ``dip`` (logit), ``causal_dip`` and ``agreement_spearman`` means; a missing value never
    triggers its criterion."""
    return bool(lens_shaped_reasons(arm, reference, is_hinge=is_hinge))


def lens_shaped_reasons(arm: dict[str, float], reference: dict[str, float], *, is_hinge: bool = True) -> list[str]:
    """Why :func:`lens_shaped_repair` flags ``arm``: ``"agreement fell"`` and/or ``"causal dip did not fall"``
    (empty: not flagged)."""

    def known(*keys: str) -> bool:
        values = [d.get(k) for d in (arm, reference) for k in keys]
        return all(v is not None and not math.isnan(v) for v in values)

    if not is_hinge or not known("dip") or arm["dip"] > (1 - LENS_SHAPED_DIP_DROP) * reference["dip"]:
        return []
    reasons = []
    if known("agreement_spearman") and (
        arm["agreement_spearman"] <= reference["agreement_spearman"] - LENS_SHAPED_AGREEMENT_DROP
    ):
        reasons.append("agreement fell")
    if known("causal_dip") and arm["causal_dip"] >= reference["causal_dip"]:
        reasons.append("causal dip did not fall")
    return reasons


def causal_table(runs: Sequence[dict[str, Any]], untrained: dict[str, Any]) -> list[dict[str, Any]]:
    """Table 5: causal (patchscope) dip and commit of every arm, the relative change of the causal dip vs the
    untrained model and vs output_only (arm means), the lens agreement (mean ± sd over seeds of the per-item means)
    and the "lens-shaped repair" flag (:func:`lens_shaped_repair`, reference: output_only when it ran, else the
    untrained model; ``reference`` names it)."""
    base_row = _row(untrained)
    base = base_row["causal_dip"]

    def means(rows: Sequence[dict[str, float | None]]) -> dict[str, float]:
        return {k: mean_sd([r[k] for r in rows])["mean"] for k in ("dip", "causal_dip", "agreement_spearman")}

    by_arm = _by_arm(runs)
    reference_name = REFERENCE_ARM if REFERENCE_ARM in by_arm else "untrained"
    reference_rows = [_row(r["eval"]) for r in by_arm[REFERENCE_ARM]] if REFERENCE_ARM in by_arm else [base_row]
    reference = means(reference_rows)
    vs_output_only = reference["causal_dip"] if reference_name == REFERENCE_ARM else None

    def change(value: float, against: float | None) -> float:
        return (value - against) / abs(against) if against and not math.isnan(against) else math.nan

    rows = [
        {
            "arm": "untrained",
            "causal_dip": mean_sd([base]),
            "causal_commit": mean_sd([base_row["causal_commit"]]),
            "logit_dip": mean_sd([base_row["dip"]]),
            "change_vs_untrained": 0.0,
            "change_vs_output_only": change(base, vs_output_only),
            "agreement_spearman": mean_sd([base_row["agreement_spearman"]]),
            "agreement_sign": mean_sd([base_row["agreement_sign"]]),
            "lens_shaped_repair": False,
            "lens_shaped_reasons": [],
            "reference": reference_name,
        }
    ]
    for arm, arm_runs in by_arm.items():
        per_seed = [_row(r["eval"]) for r in arm_runs]
        dip = mean_sd([p["causal_dip"] for p in per_seed])
        reasons = lens_shaped_reasons(means(per_seed), reference, is_hinge=_is_hinge_arm(arm_runs))
        rows.append(
            {
                "arm": arm,
                "causal_dip": dip,
                "causal_commit": mean_sd([p["causal_commit"] for p in per_seed]),
                "logit_dip": mean_sd([p["dip"] for p in per_seed]),
                "change_vs_untrained": change(dip["mean"], base),
                "change_vs_output_only": change(dip["mean"], vs_output_only),
                "agreement_spearman": mean_sd([p["agreement_spearman"] for p in per_seed]),
                "agreement_sign": mean_sd([p["agreement_sign"] for p in per_seed]),
                "lens_shaped_repair": bool(reasons),
                "lens_shaped_reasons": reasons,
                "reference": reference_name,
            }
        )
    return rows


def per_seed_mcnemar(
    runs: Sequence[dict[str, Any]], condition: str, reference: str = REFERENCE_ARM
) -> dict[str, list[dict[str, Any]]]:
    """Exact McNemar of every other arm vs ``reference`` under ``condition``, one test per seed.

    ``b``: items only the arm gets right, ``c``: items only the reference gets right.
    """
    ref = {r["seed"]: r for r in runs if r["arm"] == reference}
    out: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        if run["arm"] == reference or run["seed"] not in ref:
            continue
        mine = run["eval"]["conditions"][condition]["correct"]
        theirs = ref[run["seed"]]["eval"]["conditions"][condition]["correct"]
        test = stats.mcnemar_exact(mine, theirs)
        out.setdefault(run["arm"], []).append({"seed": run["seed"], **test})
    return out


def retention_table(runs: Sequence[dict[str, Any]], untrained: dict[str, Any]) -> list[dict[str, Any]]:
    """Table 4: accuracy per condition for the untrained model and every arm, with per-seed McNemar vs output_only."""
    rows = []
    for condition, result in untrained["conditions"].items():
        arms = {
            arm: mean_sd([r["eval"]["conditions"][condition]["accuracy"] for r in arm_runs])
            for arm, arm_runs in _by_arm(runs).items()
        }
        rows.append(
            {
                "condition": condition,
                "untrained": result["accuracy"],
                "arms": arms,
                "mcnemar_vs_output_only": per_seed_mcnemar(runs, condition),
            }
        )
    return rows


def _saturation_step(history: Sequence[dict[str, float]], key: str) -> float | None:
    return next((h["step"] for h in history if h.get(key, 0.0) >= SATURATION_ACCURACY), None)


def forecast(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """§6.5: does the end-of-training dip (DipMonitor, last probe) forecast final retention across runs?

    Per run: end-of-training probe accuracy and logit / causal dip, the first step at which probe accuracy
    reached 0.95 (output saturation), and retention (:data:`RETENTION_CONDITION` accuracy on the evaluation
    set). Across runs: Spearman ρ of end dip vs retention (negative = lower dip, better retention), and at the
    last probe the spread across arms of the arm-mean accuracy and dip.
    """
    points = []
    for run in runs:
        history = run["monitor"]
        last = history[-1] if history else {}
        points.append(
            {
                "arm": run["arm"],
                "seed": run["seed"],
                "end_step": last.get("step"),
                "end_accuracy": last.get("dip/logit/accuracy"),
                "end_logit_dip": last.get("dip/logit/max_wrong_dip"),
                "end_causal_dip": last.get("dip/causal/max_wrong_dip"),
                "saturation_step": _saturation_step(history, "dip/logit/accuracy"),
                "retention": run["eval"]["conditions"].get(RETENTION_CONDITION, {}).get("accuracy"),
            }
        )
    usable = [p for p in points if p["retention"] is not None and p["end_logit_dip"] is not None]
    retention = [p["retention"] for p in usable]
    arm_means = {
        arm: {
            key: mean_sd([p[key] for p in ps])["mean"]
            for key in ("end_accuracy", "end_logit_dip", "end_causal_dip", "retention")
        }
        for arm, ps in _by_arm(points).items()
    }

    def spread(key: str) -> float:
        values = [m[key] for m in arm_means.values() if m[key] is not None and not math.isnan(m[key])]
        return float(max(values) - min(values)) if values else math.nan

    return {
        "retention_condition": RETENTION_CONDITION,
        "saturation_accuracy": SATURATION_ACCURACY,
        "runs": points,
        "arm_means": arm_means,
        "spearman_logit_dip_vs_retention": stats.spearman([p["end_logit_dip"] for p in usable], retention),
        "spearman_causal_dip_vs_retention": stats.spearman([p["end_causal_dip"] for p in usable], retention),
        "spearman_accuracy_vs_retention": stats.spearman([p["end_accuracy"] for p in usable], retention),
        "end_accuracy_spread_across_arms": spread("end_accuracy"),
        "end_dip_spread_across_arms": spread("end_logit_dip"),
    }
