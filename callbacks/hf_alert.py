"""`DipAlertCallback`: :class:`~dipreg.callbacks.DipAlert` for the HF ``Trainer`` and TRL, a shell over
:class:`~dipreg.callbacks.alert.DipAlertRule`.

It reads the dip scalars where the HF monitor (``dipreg.callbacks.hf.DipMonitorCallback``) puts them: the Trainer's
log, delivered to every callback's ``on_log`` at the probe's ``global_step``. Any other source that logs
``dip/<lens>/accuracy`` and ``dip/<lens>/max_wrong_dip`` through ``Trainer.log`` works as well.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from dipreg.callbacks.alert import AlertShell
from dipreg.callbacks.hf import checkpoint_attributes

__all__ = ["DipAlertCallback"]

log = logging.getLogger(__name__)


class DipAlertCallback(AlertShell, TrainerCallback, ExportableState):
    """Warn, or stop training, when a lens's ``max_wrong_dip`` regresses after its held-out accuracy saturated.

    Each logged entry holding a watched lens's ``dip/<lens>/accuracy`` and ``dip/<lens>/max_wrong_dip`` goes through
    :class:`~dipreg.callbacks.alert.DipAlertRule` at ``state.global_step`` (the rule's definition is there); each alarm
    is logged as one warning line (``logging``, world process zero) naming the step and the numbers, and with
    ``action="stop"`` sets ``control.should_training_stop``. The scalars are identical on every process (the monitor
    reduces them over ranks), so every process takes the same decision at the same step without a collective. The
    rule's state is saved with each checkpoint (``ExportableState``, in ``trainer_state.json``) and restored from it
    when training resumes (with or without ``restore_callback_states_from_checkpoint``).

    Args:
        lenses: the lenses to watch.
        min_accuracy: held-out accuracy at which a lens saturates, in ``(0, 1]``.
        max_rise: tolerated rise of the dip above its best since saturation (``>= 0``).
        patience: probes in a row that must regress (``>= 1``).
        action: ``"warn"`` or ``"stop"``.

    Example::

        from dipreg.callbacks.hf import DipMonitorCallback
        from dipreg.callbacks.hf_alert import DipAlertCallback
        trainer = SFTTrainer(..., callbacks=[
            DipMonitorCallback("core", every_n_steps=15),
            DipAlertCallback(("causal",), min_accuracy=0.95, max_rise=0.1, patience=2, action="stop"),
        ])
    """

    @property
    def rule_state(self) -> dict[str, Any]:
        """The rule's state (what :meth:`state` saves; assigning it restores the rule)."""
        return self.rule.state_dict()

    @rule_state.setter
    def rule_state(self, value: dict[str, Any]) -> None:
        self.rule.load_state_dict(value)

    def state(self) -> dict[str, Any]:
        """The stateful-callback protocol (``ExportableState``): constructor arguments and the rule's state."""
        attributes = {"rule_state": self.rule_state, "stopped_step": self.stopped_step}
        return {"args": self.settings(), "attributes": attributes}

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """On resume, restore the rule from the checkpoint's entry with these arguments (when transformers did not)."""
        if self.rule.last_step >= 0:
            return
        saved = checkpoint_attributes(state, type(self).__name__, self.settings())
        if saved is not None:
            self.rule_state = saved["rule_state"]
            self.stopped_step = int(saved.get("stopped_step", -1))

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> TrainerControl | None:
        """Take a logged probe; warn for each alarm and, with ``action="stop"``, stop training."""
        logs = logs or {}
        if not any(f"dip/{lens}/max_wrong_dip" in logs for lens in self.rule.lenses):
            return None  # another entry (the training loss ...) at a step a probe may still log at
        alarms = self.take(state.global_step, logs)
        if not alarms:
            return None
        stop = self.action == "stop"
        if state.is_world_process_zero:
            for alarm in alarms:
                log.warning("DipAlertCallback: %s%s.", alarm.message(), "; stopping training" if stop else "")
        if stop:
            control.should_training_stop = True
            self.stopped_step = state.global_step
        return control
