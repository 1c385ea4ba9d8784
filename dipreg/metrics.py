"""Item-level statistics of DiD trajectories (pure tensor functions, no model).

Conventions (``docs/method.md``, "Layers, margins, DiD"): a DiD vector has one entry per decoder block ``ℓ = 1..L``;
relative depth is ``ℓ/L``; the output decision is ``s = sign(DiD(L))``. A trajectory holding a NaN or an infinity
has no defined dip or commit depth: :func:`max_wrong_dip` and :func:`commit_layer_frac` give NaN for it (never a
number that reads like a clean item); :func:`unreadable_items` finds such items and the ones whose DiD is exactly 0
at every layer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dipreg.validation import validate_window

DEFAULT_WINDOW: tuple[float, float] = (0.25, 0.90)


def depth_mask(num_layers: int, window: tuple[float, float]) -> Tensor:
    """Boolean mask over layers ``ℓ = 1..L`` with ``lo ≤ ℓ/L ≤ hi``."""
    lo, hi = validate_window(window)
    rel = torch.arange(1, num_layers + 1, dtype=torch.float64) / num_layers
    return (rel >= lo - 1e-12) & (rel <= hi + 1e-12)


def finite_items(did: Tensor) -> Tensor:
    """``(N,)`` True where every entry of the ``(N, L)`` trajectory is finite."""
    return torch.isfinite(did).all(dim=-1)


def unreadable_items(did: Tensor) -> tuple[Tensor, Tensor]:
    """``(non_finite, all_zero)``: two ``(N,)`` masks of items whose trajectory carries no reading.

    ``non_finite``: some layer is NaN or infinite. ``all_zero``: DiD is exactly 0.0 at every layer, i.e. the lens
    cannot tell the two contexts apart anywhere. Since the contexts of a pair differ, that happens only when the
    readout is degenerate: a diverged model whose residuals overflow the final norm (it then returns 0, and so
    every margin is 0), or contexts the tokenizer maps to the same tokens.
    """
    finite = finite_items(did)
    return ~finite, finite & (did == 0).all(dim=-1)


def output_sign(did: Tensor) -> Tensor:
    """``s = sign(DiD(L))`` for ``did`` of shape ``(N, L)``."""
    return torch.sign(did[..., -1])


def max_wrong_dip(did: Tensor, window: tuple[float, float] = DEFAULT_WINDOW) -> Tensor:
    """``max(0, max over ℓ in window of −s·DiD(ℓ))``: the deepest excursion against the output decision.

    Args:
        did: ``(N, L)`` DiD trajectories.
        window: relative-depth window, inclusive.

    Returns:
        ``(N,)`` non-negative dips (never ``-0.0``); 0 when the window is empty or the output is an exact tie; NaN
        for a trajectory with a non-finite entry at any layer.
    """
    mask = depth_mask(did.shape[-1], window).to(did.device)
    if not bool(mask.any()):
        dips = torch.zeros(did.shape[:-1], dtype=did.dtype, device=did.device)
    else:
        against = -output_sign(did).unsqueeze(-1) * did[..., mask]
        dips = against.max(dim=-1).values.clamp_min(0.0) + 0.0  # + 0.0 turns a -0.0 (a tie times -1) into 0.0
    return torch.where(finite_items(did), dips, torch.full_like(dips, float("nan")))


def commit_layer_frac(did: Tensor) -> Tensor:
    """The largest ``ℓ/L`` whose ``sign(DiD(ℓ))`` differs from ``s``; 0 when every layer agrees.

    An exact zero at an intermediate layer counts as disagreeing (no preference is not the output's
    preference), following the definition literally. NaN for a trajectory with a non-finite entry.
    """
    num_layers = did.shape[-1]
    disagree = torch.sign(did) != output_sign(did).unsqueeze(-1)
    depth = torch.arange(1, num_layers + 1, dtype=did.dtype, device=did.device) / num_layers
    commit = torch.where(disagree, depth, torch.zeros_like(depth)).max(dim=-1).values
    return torch.where(finite_items(did), commit, torch.full_like(commit, float("nan")))


def pair_correct(did: Tensor) -> Tensor:
    """The pair is correct when ``DiD(L) > 0``."""
    return did[..., -1] > 0


def strict_correct(margin_a: Tensor, margin_b: Tensor) -> Tensor:
    """Strict accuracy: ``margin_a(L) > 0`` and ``margin_b(L) < 0``."""
    return (margin_a[..., -1] > 0) & (margin_b[..., -1] < 0)


def aligned_did(did: Tensor) -> Tensor:
    """The output-aligned DiD ``s·DiD(ℓ)`` with ``s = sign(DiD(L))``, shape ``(N, L)`` like ``did``.

    Positive where layer ℓ prefers the answer the model outputs, negative on the wrong side (``max_wrong_dip`` is
    the deepest negative value inside the window). An exact tie at the last layer (``s = 0``) gives a zero row;
    a non-finite entry stays non-finite (``NaN·0`` included).
    """
    return output_sign(did).unsqueeze(-1) * did
