"""Training (imports Lightning): :class:`DipRegModule` (LoRA SFT with auxiliary losses), :class:`PairDataModule`,
and `dipreg fit` (:mod:`dipreg.training.fit`, the one LightningCLI every recipe is parsed with).

The core (:mod:`dipreg`) never imports this package; :mod:`dipreg.callbacks`, :mod:`dipreg.eval.arms`, the bench and
the self-check do.
"""

from dipreg.training.data import PairDataModule
from dipreg.training.module import DipRegModule

__all__ = ["DipRegModule", "PairDataModule"]
