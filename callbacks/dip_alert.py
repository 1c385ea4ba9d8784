"""`DipAlert`: warn, or stop the fit, when the wrong-dip regresses after held-out accuracy saturated.

A thin Lightning shell over :class:`dipreg.callbacks.alert.DipAlertRule` (the rule, and its exact definition, live
there). It reads each new probe of a :class:`~dipreg.callbacks.DipMonitor` from ``trainer.callback_metrics``, where
the monitor puts its scalars, and adds ``dip/<lens>/max_wrong_dip_saturated`` there for ``ModelCheckpoint`` to gate on.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from dipreg.callbacks.alert import AlertShell
from dipreg.callbacks.dip_monitor import DipMonitor
from dipreg.callbacks.probe import MonitorSetupError

__all__ = ["DipAlert", "saturated_key"]


def saturated_key(lens: str) -> str:
    """The ``trainer.callback_metrics`` key of a lens's dip gated on saturated accuracy."""
    return f"dip/{lens}/max_wrong_dip_saturated"


class DipAlert(AlertShell, Callback):
    """Warn or stop when a lens's ``max_wrong_dip`` rises after its held-out accuracy saturated.

    After every probe of the :class:`~dipreg.callbacks.DipMonitor` it watches (the first in the Trainer's callbacks
    that reads every lens of ``lenses``; it must come before this callback in the list), the probe's
    ``dip/<lens>/accuracy`` and ``dip/<lens>/max_wrong_dip`` go through :class:`~dipreg.callbacks.DipAlertRule`: a lens
    saturates at the first probe whose accuracy is ``>= min_accuracy``; from then on, when its dip exceeds the lowest
    dip seen since by more than ``max_rise`` for ``patience`` probes in a row, the callback writes one line naming
    the step, the lens and the numbers (``rank_zero_warn``) and, with ``action="stop"``, stops the fit
    (``trainer.should_stop``, the way ``EarlyStopping`` does: the decision is reduced over ranks, so every process
    stops at the same step).

    It also puts ``dip/<lens>/max_wrong_dip_saturated`` into ``trainer.callback_metrics`` after each probe: the dip
    when that probe's accuracy is ``>= min_accuracy``, ``+inf`` when not, so that
    ``ModelCheckpoint(monitor="dip/causal/max_wrong_dip_saturated", mode="min")`` keeps the checkpoint with the
    lowest dip at saturated accuracy. The rule's state (saturation, best dip, run of regressions) is saved in the
    checkpoint, so a resumed fit goes on as one run.

    Args:
        lenses: the lenses to watch (the monitor must read each).
        min_accuracy: held-out accuracy at which a lens saturates, in ``(0, 1]``.
        max_rise: tolerated rise of the dip above its best since saturation (``>= 0``, logit units).
        patience: probes in a row that must regress (``>= 1``).
        action: ``"warn"`` (a warning per alarm) or ``"stop"`` (the warning, then stop the fit).

    Example::

        from dipreg.callbacks import DipAlert, DipMonitor
        trainer = L.Trainer(callbacks=[
            DipMonitor("core", every_n_steps=15, lenses=("logit", "causal")),
            DipAlert(("causal",), min_accuracy=0.95, max_rise=0.1, patience=2, action="stop"),
        ])
    """

    #: The monitor whose probes this alert takes, found at ``setup``.
    _monitor: DipMonitor | None = None

    @property
    def state_key(self) -> str:
        """Distinguishes alerts with different lenses or settings in one checkpoint."""
        return self._generate_state_key(**self.settings())

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Find the monitor that reads every watched lens, listed before this callback, so that a misconfiguration
        fails before step 1."""
        callbacks = list(trainer.callbacks)
        before = callbacks[: callbacks.index(self)] if self in callbacks else callbacks
        monitors = [cb for cb in callbacks if isinstance(cb, DipMonitor)]
        fitting = [m for m in monitors if set(self.rule.lenses) <= set(m.lenses)]
        if not fitting:
            read = ", ".join(f"DipMonitor(lenses={m.lenses})" for m in monitors) or "no DipMonitor"
            raise MonitorSetupError(
                f"DipAlert watches lenses {self.rule.lenses} but the Trainer has {read}; add a DipMonitor that reads "
                f"them (lenses=(..., {', '.join(repr(lens) for lens in self.rule.lenses)})) or change lenses=."
            )
        if not any(m in before for m in fitting):
            raise MonitorSetupError(
                "DipAlert must come after the DipMonitor it watches in the Trainer's callbacks (it reads each probe "
                "in the same hook): list DipMonitor(...) first."
            )
        self._monitor = next(m for m in fitting if m in before)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Take the monitor's probe before the first step."""
        self._check(trainer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Take the probe the monitor ran at this step, if any."""
        self._check(trainer)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Take the monitor's validation-end probe, if any (before ``ModelCheckpoint`` reads the metrics)."""
        if not trainer.sanity_checking:
            self._check(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Take the monitor's final probe (an alarm there warns; there is nothing left to stop)."""
        self._check(trainer)

    def _check(self, trainer: pl.Trainer) -> None:
        """When the monitor probed since the last check: feed the rule, publish the gated dips, act on alarms."""
        assert self._monitor is not None, "setup() did not run"
        step = self._monitor.last_step
        if step <= self.rule.last_step:
            return
        metrics = trainer.callback_metrics
        # Only the keys this probe wrote: callback_metrics keeps a lens's last values while probes skip it
        # (causal_every), and a stale value is no reading of this step.
        written = self._monitor.history[-1]
        scalars = {key: float(metrics[key]) for key in written if key.startswith("dip/") and key in metrics}
        for lens in self.rule.lenses:
            gated = self.rule.gated_dip(lens, scalars)
            if gated is not None:
                metrics[saturated_key(lens)] = torch.tensor(gated, dtype=torch.float64)
        alarms = self.take(step, scalars)
        stop = self.action == "stop" and bool(alarms)
        if self.action == "stop":  # every rank calls the collective at every probe, as EarlyStopping does
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        for alarm in alarms:
            rank_zero_warn(f"DipAlert: {alarm.message()}{'; stopping the fit' if stop else ''}.")
        if stop:
            trainer.should_stop = True
            self.stopped_step = step

    def state_dict(self) -> dict[str, Any]:
        """The rule's state and the step the fit was stopped at (primitives only)."""
        return {"rule": self.rule.state_dict(), "stopped_step": self.stopped_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` so that a resumed fit continues the rule as one run."""
        self.rule.load_state_dict(state_dict.get("rule", {}))
        self.stopped_step = int(state_dict.get("stopped_step", -1))
