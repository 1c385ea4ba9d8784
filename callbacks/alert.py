"""`DipAlertRule`: decide, probe by probe, whether the wrong-dip of a model whose accuracy has saturated regressed.

The rule is plain Python over the scalars a dip probe produces (``dip/<lens>/accuracy`` and
``dip/<lens>/max_wrong_dip``, as :class:`~dipreg.callbacks.DipMonitor` logs them), so any training loop can feed it.
It imports no training framework (``from dipreg.callbacks import DipAlertRule`` does not import Lightning), as
:class:`~dipreg.callbacks.DipTracker` does not: :class:`dipreg.callbacks.DipAlert` is the Lightning shell around it.

The rule, per watched lens:

1. **Saturation.** The lens saturates at the first probe whose ``dip/<lens>/accuracy`` is at least
   ``min_accuracy`` (``>=``: a probe exactly at the threshold saturates) and whose dip is finite. It stays saturated
   for the rest of the run: a later fall in accuracy is what ``EarlyStopping`` on the accuracy watches, not this rule.
2. **Best dip.** From that probe on, the rule keeps the lowest ``dip/<lens>/max_wrong_dip`` seen (the best) and the
   step it was seen at; the saturating probe's dip is the first best.
3. **Regression.** A later probe regresses when its dip exceeds the best by more than ``max_rise`` (strictly:
   ``dip − best > max_rise``), or is not finite (a diverged model). A probe that does not regress resets the count.
4. **Alarm.** When ``patience`` probes in a row regress, the rule raises a :class:`DipAlarm` for that lens, and again
   at every later probe while the run of regressions lasts.

A probe that did not read a lens (``causal_every`` > 1) leaves that lens's state as it was. Each step is taken once:
:meth:`DipAlertRule.update` ignores a step at or before the last one it took, so feeding a probe twice (or again
after a resume) changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["ACTIONS", "AlertShell", "DipAlarm", "DipAlertRule"]

#: What a framework shell does on an alarm: ``"warn"`` (one line per alarm) or ``"stop"`` (the line, then stop).
ACTIONS = ("warn", "stop")


def _number(owner: str, name: str, value: object, low: float, high: float, hint: str) -> float:
    """``value`` as a float when it is a finite real (a ``bool`` is not) in ``[low, high]``; else one clear error."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ValueError(f"{owner}: {name} must be a number in [{low:g}, {high:g}], got {value!r}; {hint}.")
    return float(value)


@dataclass(frozen=True)
class DipAlarm:
    """One lens whose dip regressed after its accuracy saturated: where, and by how much.

    Attributes:
        lens: the lens (``"causal"``, ``"logit"``, ...).
        step: the step of the probe that raised the alarm.
        dip: that probe's ``dip/<lens>/max_wrong_dip``.
        best: the lowest dip seen since saturation, and ``best_step`` where it was seen.
        accuracy: that probe's ``dip/<lens>/accuracy``.
        regressed: how many probes in a row have regressed (at least the rule's ``patience``).
        max_rise: the rule's tolerated rise above the best.
    """

    lens: str
    step: int
    dip: float
    best: float
    best_step: int
    accuracy: float
    regressed: int
    max_rise: float

    @property
    def rise(self) -> float:
        """How far the dip rose above its best (``dip − best``)."""
        return self.dip - self.best

    def message(self) -> str:
        """One line naming the step, the lens and the numbers."""
        return (
            f"dip regression at step {self.step}: dip/{self.lens}/max_wrong_dip = {self.dip:.4f} is {self.rise:+.4f} "
            f"above its best {self.best:.4f} (step {self.best_step}) since accuracy saturated, more than "
            f"max_rise={self.max_rise:g} for {self.regressed} probe(s) in a row (accuracy {self.accuracy:.3f})"
        )


@dataclass
class _LensState:
    """What the rule remembers about one lens (primitives only: it goes into checkpoints)."""

    saturated_step: int = -1
    best: float = math.inf
    best_step: int = -1
    regressed: int = 0

    @property
    def saturated(self) -> bool:
        return self.saturated_step >= 0


class DipAlertRule:
    """Raise an alarm when a lens's wrong-dip regresses after its held-out accuracy saturated (module docstring).

    Args:
        lenses: the lenses to watch; each needs ``dip/<lens>/accuracy`` and ``dip/<lens>/max_wrong_dip`` in the
            scalars of the probes that read it.
        min_accuracy: the accuracy at which a lens saturates (``>=``), in ``(0, 1]``.
        max_rise: the rise of the dip above its best since saturation that is tolerated (``>= 0``, in the dip's
            units: logit differences); a larger rise regresses.
        patience: how many probes in a row must regress before the alarm (``>= 1``).

    Example::

        rule = DipAlertRule(("causal",), min_accuracy=0.95, max_rise=0.2, patience=2)
        for step in range(0, 300, 15):
            scalars = probe(model)  # {"dip/causal/accuracy": ..., "dip/causal/max_wrong_dip": ..., ...}
            for alarm in rule.update(step, scalars):
                print(alarm.message())
    """

    def __init__(
        self,
        lenses: Sequence[str] = ("causal",),
        *,
        min_accuracy: float = 0.95,
        max_rise: float = 0.1,
        patience: int = 2,
    ) -> None:
        owner = type(self).__name__
        if isinstance(lenses, str) or not lenses or not all(isinstance(lens, str) and lens for lens in lenses):
            raise ValueError(
                f"{owner}: lenses must be a non-empty sequence of lens names such as ('causal',) or "
                f"('logit', 'causal'), got {lenses!r}."
            )
        if len(set(lenses)) != len(lenses):
            raise ValueError(f"{owner}: lenses lists a lens twice ({list(lenses)}); list each lens once.")
        self.lenses = tuple(lenses)
        self.min_accuracy = _number(
            owner, "min_accuracy", min_accuracy, 0.0, 1.0, "pass the held-out accuracy that counts as saturated"
        )
        if self.min_accuracy == 0.0:
            raise ValueError(f"{owner}: min_accuracy must be > 0 (every probe would saturate); e.g. 0.95.")
        self.max_rise = _number(
            owner, "max_rise", max_rise, 0.0, math.inf, "pass the tolerated rise of max_wrong_dip, e.g. 0.1"
        )
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"{owner}: patience must be an integer >= 1 (probes in a row), got {patience!r}.")
        self.patience = patience
        self.last_step = -1
        self._states = {lens: _LensState() for lens in self.lenses}

    def __repr__(self) -> str:
        return (
            f"DipAlertRule(lenses={self.lenses}, min_accuracy={self.min_accuracy:g}, max_rise={self.max_rise:g}, "
            f"patience={self.patience})"
        )

    def saturated_step(self, lens: str) -> int | None:
        """The step at which ``lens`` saturated, ``None`` while it has not."""
        state = self._states[lens]
        return state.saturated_step if state.saturated else None

    def best(self, lens: str) -> tuple[float, int] | None:
        """``(lowest dip since saturation, its step)`` for ``lens``, ``None`` while it has not saturated."""
        state = self._states[lens]
        return (state.best, state.best_step) if state.saturated else None

    def gated_dip(self, lens: str, scalars: Mapping[str, float]) -> float | None:
        """``dip/<lens>/max_wrong_dip`` of one probe when its accuracy is at least ``min_accuracy``, ``+inf`` when it
        is not (so that ``mode="min"`` never prefers an unsaturated probe), ``None`` when the probe did not read
        ``lens``."""
        read = _read(lens, scalars)
        if read is None:
            return None
        accuracy, dip = read
        return dip if accuracy >= self.min_accuracy else math.inf

    def update(self, step: int, scalars: Mapping[str, float]) -> list[DipAlarm]:
        """Take one probe's scalars at ``step``; return the alarms it raises (empty when none, or when ``step`` is not
        after the last step taken)."""
        if step <= self.last_step:
            return []
        self.last_step = step
        alarms = []
        for lens in self.lenses:
            read = _read(lens, scalars)
            if read is not None:
                alarm = self._update_lens(lens, step, *read)
                if alarm is not None:
                    alarms.append(alarm)
        return alarms

    def _update_lens(self, lens: str, step: int, accuracy: float, dip: float) -> DipAlarm | None:
        state = self._states[lens]
        if not state.saturated:
            if accuracy >= self.min_accuracy and math.isfinite(dip):
                state.saturated_step, state.best, state.best_step = step, dip, step
            return None
        if math.isfinite(dip) and dip < state.best:
            state.best, state.best_step = dip, step
        regressed = not math.isfinite(dip) or dip - state.best > self.max_rise
        state.regressed = state.regressed + 1 if regressed else 0
        if state.regressed < self.patience:
            return None
        return DipAlarm(lens, step, dip, state.best, state.best_step, accuracy, state.regressed, self.max_rise)

    def state_dict(self) -> dict[str, Any]:
        """The last step taken and each lens's saturation, best dip and run of regressions (primitives only)."""
        return {"last_step": self.last_step, "lenses": {lens: vars(s).copy() for lens, s in self._states.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; lenses the state does not know start fresh, unknown keys are ignored."""
        self.last_step = int(state.get("last_step", -1))
        saved = state.get("lenses", {})
        for lens in self.lenses:
            fields = saved.get(lens, {})
            self._states[lens] = _LensState(
                saturated_step=int(fields.get("saturated_step", -1)),
                best=float(fields.get("best", math.inf)),
                best_step=int(fields.get("best_step", -1)),
                regressed=int(fields.get("regressed", 0)),
            )


def _read(lens: str, scalars: Mapping[str, Any]) -> tuple[float, float] | None:
    """``(accuracy, max_wrong_dip)`` of ``lens`` in one probe's scalars (floats or 0-d tensors), ``None`` when the
    probe did not read it."""
    accuracy, dip = scalars.get(f"dip/{lens}/accuracy"), scalars.get(f"dip/{lens}/max_wrong_dip")
    if accuracy is None or dip is None:
        return None
    return float(accuracy), float(dip)


class AlertShell:
    """What the framework shells (:class:`~dipreg.callbacks.DipAlert`, ``DipAlertCallback``) share: their constructor
    (the rule's settings and an ``action``), the alarms raised so far, and the step training was stopped at.

    Args:
        lenses, min_accuracy, max_rise, patience: the :class:`DipAlertRule`'s.
        action: ``"warn"`` (one line per alarm) or ``"stop"`` (the line, then stop training).
    """

    def __init__(
        self,
        lenses: Sequence[str] = ("causal",),
        *,
        min_accuracy: float = 0.95,
        max_rise: float = 0.1,
        patience: int = 2,
        action: Literal["warn", "stop"] = "warn",
    ) -> None:
        self.rule = DipAlertRule(lenses, min_accuracy=min_accuracy, max_rise=max_rise, patience=patience)
        if action not in ACTIONS:
            raise ValueError(f"{type(self).__name__}: action must be 'warn' or 'stop', got {action!r}.")
        self.action = action
        #: Every alarm raised in this process's run.
        self.alarms: list[DipAlarm] = []
        #: The step at which training was stopped, ``-1`` while it was not.
        self.stopped_step = -1

    def settings(self) -> dict[str, Any]:
        """The constructor's arguments (JSON-ready), e.g. to tell two alerts apart in a checkpoint."""
        rule = self.rule
        return {
            "lenses": list(rule.lenses),
            "min_accuracy": rule.min_accuracy,
            "max_rise": rule.max_rise,
            "patience": rule.patience,
            "action": self.action,
        }

    def take(self, step: int, scalars: Mapping[str, float]) -> list[DipAlarm]:
        """Feed one probe to the rule; the alarms it raised (also kept in :attr:`alarms`)."""
        alarms = self.rule.update(step, scalars)
        self.alarms.extend(alarms)
        return alarms
