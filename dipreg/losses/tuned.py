"""`TunedMarginHinge`: the dip regulariser read through a frozen, trained tuned lens instead of the logit lens."""

from __future__ import annotations

from torch import Tensor

from dipreg.lenses.tuned import DEFAULT_CORPUS, TunedLens, load_tuned_lens, tuned_lens_options
from dipreg.losses.base import HINGE_WINDOW, BatchView
from dipreg.losses.logit import WrongMarginHinge

__all__ = ["TunedMarginHinge"]


class TunedMarginHinge(WrongMarginHinge):
    """``relu(δ − tuned-lens margin_ℓ)`` over the window's layers and the batch rows.

    The margin of block ``ℓ`` is ``U[c]·N(T_ℓ(h_ℓ)) − U[w]·N(T_ℓ(h_ℓ))`` with ``T_ℓ`` the translator of a trained
    tuned lens (:class:`~dipreg.lenses.tuned.TunedLens`). The lens is loaded at the first call, moved to the model's
    device and frozen: its weights never train and never enter a checkpoint; gradients reach the model's LoRA weights
    through ``h_ℓ`` only.

    Args:
        tuned_lens: a trained lens (a ``tuned-lens.pt`` file or its folder), or a corpus name (``out-of-domain``,
            ``in-domain``) for the lens `dipreg tuned-lens train` wrote to its default location; ``None``: the
            default corpus's. The same values as ``--tuned-lens``.
        window: relative-depth window ``(lo, hi)``.
        delta: the margin ``δ`` a layer must reach to cost nothing.
        weight: ``λ`` (>= 0).

    Example:
        >>> hinge = TunedMarginHinge(tuned_lens="runs/tl", weight=0.2)
        >>> hinge.name
        'tuned_hinge'
    """

    name = "tuned_hinge"

    def __init__(
        self,
        tuned_lens: str | None = None,
        window: tuple[float, float] = HINGE_WINDOW,
        delta: float = 0.0,
        weight: float = 0.2,
    ) -> None:
        super().__init__(window=window, delta=delta, weight=weight)
        self.tuned_lens = tuned_lens
        self.lens: TunedLens | None = None

    def __repr__(self) -> str:
        return (
            f"TunedMarginHinge(tuned_lens={self.tuned_lens!r}, window={self.window}, delta={self.delta}, "
            f"weight={self.weight})"
        )

    def _lens(self, view: BatchView) -> TunedLens:
        if self.lens is None:
            options = tuned_lens_options(self.tuned_lens) or {"corpus": DEFAULT_CORPUS}
            lens = load_tuned_lens(view.adapter, **options)
            self.lens = lens.requires_grad_(False).eval()
        return self.lens

    def window_margins(self, view: BatchView, layers: list[int]) -> Tensor:
        """Tuned-lens margins of the window's blocks: ``(len(layers), B)``."""
        translated = self._lens(view)(view.residuals)  # translators are per layer: translate the whole stack
        return view.adapter.margin(translated[layers], view.correct_ids, view.wrong_ids)
