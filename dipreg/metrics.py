"""Item-level statistics of DiD trajectories (pure tensor functions, no model).

Conventions (DESIGN.md): a DiD vector has one entry per decoder block ``ℓ = 1..L``; relative depth is ``ℓ/L``;
the output decision is ``s = sign(DiD(L))``.
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_WINDOW: tuple[float, float] = (0.25, 0.90)


def validate_window(window: tuple[float, float], name: str = "window") -> tuple[float, float]:
    """Check a relative-depth window ``(lo, hi)`` with ``0 ≤ lo ≤ hi ≤ 1`` and return it as floats."""
    try:
        lo, hi = (float(w) for w in window)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a pair (lo, hi) of relative depths, got {window!r}.") from err
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"{name}={window!r} must satisfy 0 <= lo <= hi <= 1 (relative depths ℓ/L).")
    return lo, hi


def depth_mask(num_layers: int, window: tuple[float, float]) -> Tensor:
    """Boolean mask over layers ``ℓ = 1..L`` with ``lo ≤ ℓ/L ≤ hi``."""
    lo, hi = validate_window(window)
    rel = torch.arange(1, num_layers + 1, dtype=torch.float64) / num_layers
    return (rel >= lo - 1e-12) & (rel <= hi + 1e-12)


def output_sign(did: Tensor) -> Tensor:
    """``s = sign(DiD(L))`` for ``did`` of shape ``(N, L)``."""
    return torch.sign(did[..., -1])


def max_wrong_dip(did: Tensor, window: tuple[float, float] = DEFAULT_WINDOW) -> Tensor:
    """``max(0, max over ℓ in window of −s·DiD(ℓ))``: the deepest excursion against the output decision.

    Args:
        did: ``(N, L)`` DiD trajectories.
        window: relative-depth window, inclusive.

    Returns:
        ``(N,)`` non-negative dips; 0 when the window is empty or the output is an exact tie.
    """
    mask = depth_mask(did.shape[-1], window).to(did.device)
    if not bool(mask.any()):
        return torch.zeros(did.shape[:-1], dtype=did.dtype, device=did.device)
    against = -output_sign(did).unsqueeze(-1) * did[..., mask]
    return against.max(dim=-1).values.clamp_min(0.0)


def commit_layer_frac(did: Tensor) -> Tensor:
    """The largest ``ℓ/L`` whose ``sign(DiD(ℓ))`` differs from ``s``; 0 when every layer agrees.

    An exact zero at an intermediate layer counts as disagreeing (no preference is not the output's
    preference), following the definition literally.
    """
    num_layers = did.shape[-1]
    disagree = torch.sign(did) != output_sign(did).unsqueeze(-1)
    depth = torch.arange(1, num_layers + 1, dtype=did.dtype, device=did.device) / num_layers
    return torch.where(disagree, depth, torch.zeros_like(depth)).max(dim=-1).values


def pair_correct(did: Tensor) -> Tensor:
    """The pair is correct when ``DiD(L) > 0``."""
    return did[..., -1] > 0


def strict_correct(margin_a: Tensor, margin_b: Tensor) -> Tensor:
    """Strict accuracy: ``margin_a(L) > 0`` and ``margin_b(L) < 0``."""
    return (margin_a[..., -1] > 0) & (margin_b[..., -1] < 0)
