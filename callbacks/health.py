"""`TrainingHealth`: stop a fit whose training loss is non-finite or stuck at the loss of a uniform guess.

A learning rate far too large (``dipreg fit --recipe output_only --model.lr 1e9``) blows the residual stream up
until the final norm returns zeros: every logit is equal, the answer-token cross-entropy is pinned at ``ln V``
(``V`` = vocabulary size; 10.80 on the default model) and nothing is learnt any more; or the loss turns NaN. The
callback stops such a run with :class:`TrainingDivergedError` (a ``ValueError``: `dipreg fit` prints it as one
``error:`` line and exits with code 2) naming the optimizer step, instead of letting it finish with exit code 0.

Rules, checked after every training batch:

- a non-finite training loss (NaN or ±inf) stops the fit at once;
- a loss ``≥ ln V − tolerance`` for ``diverged_steps`` consecutive optimizer steps stops it (``None`` turns this
  rule off). ``V`` is read from the module's model config (``pl_module.model.config.vocab_size``) unless given.

The loss of an optimizer step is the mean over its micro-batches (gradient accumulation), scaled back to the
value ``training_step`` returned. In a distributed fit every process checks its own loss and all of them stop
when one does. Steps are numbered with ``trainer.global_step`` (a resumed fit goes on from its
checkpoint's step; the count of stuck steps starts again at the resume).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from dipreg.validation import validate_count, validate_number

__all__ = ["DEFAULT_DIVERGED_STEPS", "TrainingDivergedError", "TrainingHealth", "vocab_size_of"]

#: Consecutive optimizer steps at or above ``ln V`` after which :class:`TrainingHealth` stops a fit.
DEFAULT_DIVERGED_STEPS = 10


class TrainingDivergedError(ValueError):
    """The training loss became non-finite or stayed at ``ln V`` (a uniform guess): the fit was stopped."""


def vocab_size_of(pl_module: pl.LightningModule) -> int | None:
    """The vocabulary size of the model a LightningModule trains: ``pl_module.model.config.vocab_size`` (PEFT
    wrappers forward ``config``), else ``pl_module.config.vocab_size``; ``None`` when neither exists."""
    for owner in (getattr(pl_module, "model", None), pl_module):
        size = getattr(getattr(owner, "config", None), "vocab_size", None)
        if isinstance(size, int) and not isinstance(size, bool) and size > 1:
            return size
    return None


def _loss_value(outputs: Any) -> float | None:
    """The loss ``training_step`` returned (a tensor, or a mapping holding ``"loss"``) as a float; ``None`` when the
    step was skipped (``training_step`` returned ``None``)."""
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    if loss is None:
        return None
    if isinstance(loss, torch.Tensor):
        return float(loss.detach().float().mean())
    return float(loss)


def _on_any_process(trainer: Any, decision: bool) -> bool:
    """``decision`` of this process, or'ed over every process of a distributed fit (so all of them stop together
    instead of the others waiting forever for the one that stopped); a trainer without a strategy is one process."""
    strategy = getattr(trainer, "strategy", None)
    if strategy is None:
        return decision
    return bool(strategy.reduce_boolean_decision(decision, all=False))


class TrainingHealth(Callback):
    """Stop the fit with :class:`TrainingDivergedError` when the training loss is non-finite, or stays at or above
    ``ln V`` (the loss of a uniform guess over the vocabulary) for ``diverged_steps`` consecutive optimizer steps.

    Args:
        diverged_steps: consecutive steps with loss ``≥ ln V − tolerance`` that stop the fit (an integer ≥ 1);
            ``None`` disables this rule (a non-finite loss still stops the fit).
        tolerance: how far below ``ln V`` a loss still counts as stuck there (float rounding of a uniform
            softmax; ≥ 0).
        vocab_size: ``V``; ``None`` reads it from the module's model config (see :func:`vocab_size_of`).

    Example:
        >>> trainer = lightning.Trainer(callbacks=[TrainingHealth(diverged_steps=20)])  # doctest: +SKIP

    In `dipreg fit` and `dipreg arms` it is always attached; its options are ``--health.diverged_steps``,
    ``--health.tolerance`` and ``--health.vocab_size`` (``--health.diverged_steps null`` turns the ``ln V`` rule
    off).
    """

    def __init__(
        self,
        diverged_steps: int | None = DEFAULT_DIVERGED_STEPS,
        tolerance: float = 1e-3,
        vocab_size: int | None = None,
    ) -> None:
        validate_count(
            diverged_steps, "TrainingHealth: diverged_steps (--health.diverged_steps)", 1, "rule off", allow_none=True
        )
        validate_number(tolerance, "TrainingHealth: tolerance (--health.tolerance)", 0.0)
        validate_count(vocab_size, "TrainingHealth: vocab_size (--health.vocab_size)", 2, allow_none=True)
        self.diverged_steps = diverged_steps
        self.tolerance = float(tolerance)
        self.vocab_size = vocab_size
        self.threshold = math.nan  # ln V - tolerance, set at fit start
        self._vocab = 0
        self._seen_step = 0
        self._pending: list[float] = []
        self._stuck = 0
        self._first_stuck = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Resolve ``V`` (an error before step 1 when the ``ln V`` rule is on and ``V`` cannot be read)."""
        vocab = self.vocab_size or vocab_size_of(pl_module)
        if vocab is None and self.diverged_steps is not None:
            raise ValueError(
                f"TrainingHealth: cannot read the vocabulary size of {type(pl_module).__name__} (no "
                "model.config.vocab_size); pass vocab_size=V, or diverged_steps=None "
                "(--health.diverged_steps null) to check only for a non-finite loss."
            )
        self._vocab = vocab or 0
        self.threshold = math.log(vocab) - self.tolerance if vocab else math.nan

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start counting at the current step (0, or the step a resumed checkpoint holds)."""
        self._seen_step = trainer.global_step
        self._pending, self._stuck, self._first_stuck = [], 0, 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Check the batch's loss; when an optimizer step has completed, check the step's mean loss."""
        value = _loss_value(outputs)
        if value is None:
            return
        value *= max(int(trainer.accumulate_grad_batches), 1)  # Lightning divides the loss by it
        stepped = trainer.global_step > self._seen_step
        step = trainer.global_step if stepped else trainer.global_step + 1  # the (1-based) step this batch feeds
        finite_here = math.isfinite(value)
        if _on_any_process(trainer, not finite_here):
            loss_text = f"{value}" if not finite_here else "non-finite on another process"
            raise TrainingDivergedError(
                f"Training stopped at optimizer step {step} (epoch {trainer.current_epoch}, batch {batch_idx}): "
                f"the training loss is {loss_text}{self._lr_text(pl_module)}. The run diverged: lower the learning "
                "rate (--model.lr), clip gradients (--trainer.gradient_clip_val 1.0) or check the data."
            )
        self._pending.append(value)
        if not stepped:
            return
        self._seen_step = trainer.global_step
        loss = sum(self._pending) / len(self._pending)
        self._pending = []
        if self.diverged_steps is None:
            return
        if loss < self.threshold:
            self._stuck = 0
        else:
            self._stuck += 1
            self._first_stuck = step if self._stuck == 1 else self._first_stuck
        stuck_here = self._stuck >= self.diverged_steps
        if _on_any_process(trainer, stuck_here):  # every process steps together, so every one asks here
            where = (
                f"for {self._stuck} consecutive steps ({self._first_stuck}..{step}; last loss {loss:.4f})"
                if stuck_here
                else "on another process"
            )
            raise TrainingDivergedError(
                f"Training stopped at optimizer step {step}: the training loss has been >= ln V = "
                f"ln({self._vocab}) = {math.log(self._vocab):.4f} (the loss of a uniform guess over the vocabulary) "
                f"{where}{self._lr_text(pl_module)}: the model has stopped learning. Lower the learning rate "
                "(--model.lr), or pass --health.diverged_steps null to keep training."
            )

    @staticmethod
    def _lr_text(pl_module: pl.LightningModule) -> str:
        """`` with lr=...`` when the module has an ``lr`` hyperparameter, else nothing."""
        lr = getattr(pl_module, "hparams", {}).get("lr")
        return f" with lr={lr:g}" if isinstance(lr, int | float) and not isinstance(lr, bool) else ""
