"""Lens agreement: does the logit lens tell the same layer-wise story as the causal lens, item by item?

For item ``i`` with DiD trajectories ``d_logit`` and ``d_causal`` (``(L,)`` each) and the window ``W`` of
``max_wrong_dip`` (blocks with ``lo ≤ ℓ/L ≤ hi``):

* ``spearman_i`` = Spearman's ρ (:func:`scipy.stats.spearmanr`, average ranks for ties) between
  ``d_logit[W]`` and ``d_causal[W]``; undefined (NaN) when either is constant on ``W``, fewer than two layers
  are in ``W``.
* ``sign_i`` = the share of layers in ``W`` where ``sign(d_logit(ℓ)) == sign(d_causal(ℓ))`` (an exact 0 is its
  own sign); NaN when ``W`` is empty.

Both are NaN for an item with a non-finite value at any layer (unreadable, as for ``max_wrong_dip``).

A set's agreement is the mean of each over the items where it is defined (with the count of those items).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats
from torch import Tensor

from dipreg.metrics import DEFAULT_WINDOW, depth_mask

__all__ = ["AgreementSummary", "item_agreement", "summarise_agreement"]


def item_agreement(
    did_logit: Tensor, did_causal: Tensor, window: tuple[float, float] = DEFAULT_WINDOW
) -> tuple[list[float], list[float]]:
    """Per-item ``(spearman, sign)`` agreement of two ``(N, L)`` DiD trajectory sets (see the module doc)."""
    if did_logit.shape != did_causal.shape:
        raise ValueError(f"Trajectory shapes differ: {tuple(did_logit.shape)} vs {tuple(did_causal.shape)}.")
    mask = depth_mask(did_logit.shape[-1], window).numpy()
    logit = did_logit.detach().double().cpu().numpy()
    causal = did_causal.detach().double().cpu().numpy()
    # an item with a non-finite value at any layer is unreadable (as for max_wrong_dip): NaN
    readable = np.isfinite(logit).all(axis=-1) & np.isfinite(causal).all(axis=-1)
    rho: list[float] = []
    sign: list[float] = []
    for a, b, ok in zip(logit[:, mask], causal[:, mask], readable, strict=True):
        if not ok or a.size == 0:
            rho.append(math.nan)
            sign.append(math.nan)
            continue
        sign.append(float((np.sign(a) == np.sign(b)).mean()))
        if a.size < 2 or np.all(a == a[0]) or np.all(b == b[0]):
            rho.append(math.nan)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rho.append(float(stats.spearmanr(a, b).statistic))
    return rho, sign


@dataclass(frozen=True)
class AgreementSummary:
    """Mean per-item agreement of a set: ``spearman`` over ``n_spearman`` items, ``sign`` over ``n_sign``."""

    spearman: float
    sign: float
    n_spearman: int
    n_sign: int

    def as_dict(self) -> dict[str, float | int]:
        """JSON-ready fields."""
        return {"spearman": self.spearman, "sign": self.sign, "n_spearman": self.n_spearman, "n_sign": self.n_sign}


def summarise_agreement(rho: list[float], sign: list[float]) -> AgreementSummary:
    """Means over the items where each measure is defined (NaN when none is)."""

    def mean(values: list[float]) -> tuple[float, int]:
        kept = [v for v in values if not math.isnan(v)]
        return (float(np.mean(kept)) if kept else math.nan), len(kept)

    (r, nr), (s, ns) = mean(rho), mean(sign)
    return AgreementSummary(r, s, nr, ns)
