"""The monitors' overall scalars recomputed from ``dipreg.trajectories``: the independent reference that the HF
callback's tests and GPU check compare a probe with."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from dipreg import trajectories
from dipreg.agreement import item_agreement
from dipreg.stimuli import MinimalPair


def reference_scalars(model: nn.Module, tokenizer: Any, pairs: Sequence[MinimalPair]) -> dict[str, float]:
    """``dip/<lens>/{accuracy,max_wrong_dip,commit_layer_frac}`` for the logit and causal lenses and
    ``dip/agreement/{spearman,sign}``, as means over ``pairs`` of ``model`` as it is now (no sharding, no metrics)."""
    by_lens = {lens: trajectories(model, tokenizer, pairs, lens=lens) for lens in ("logit", "causal")}
    out = {}
    for lens, traj in by_lens.items():
        out[f"dip/{lens}/accuracy"] = traj.correct.double().mean().item()
        out[f"dip/{lens}/max_wrong_dip"] = traj.max_wrong_dip.double().mean().item()
        out[f"dip/{lens}/commit_layer_frac"] = traj.commit_layer_frac.double().mean().item()
    rho, sign = item_agreement(by_lens["logit"].did, by_lens["causal"].did)
    out["dip/agreement/spearman"] = sum(rho) / len(rho)
    out["dip/agreement/sign"] = sum(sign) / len(sign)
    return out
