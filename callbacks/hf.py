"""`DipMonitorCallback`: the dip monitor as a ``transformers.TrainerCallback`` for HF Trainer / TRL users.

It shares :class:`~dipreg.callbacks.probe.DipProbe` with the Lightning monitor and writes TensorBoard events
where the Trainer's TensorBoard integration writes (``$TENSORBOARD_LOGGING_DIR``, else ``args.logging_dir`` on
transformers 4, else ``<output_dir>/runs``) unless ``log_dir`` is given.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from dipreg.artifacts import write_json
from dipreg.callbacks.figures import history_figure, trajectory_figure
from dipreg.callbacks.probe import (
    DipProbe,
    MonitorSetupError,
    ProbeSchedule,
    _tokenizer_from_model,
    positive_int,
    resolve_pairs,
)
from dipreg.metrics import DEFAULT_WINDOW
from dipreg.stimuli import MinimalPair


class DipMonitorCallback(TrainerCallback):
    """Log ``dip/...`` scalars, a dip histogram and figures every N steps of an HF ``Trainer`` run.

    As :class:`~dipreg.callbacks.DipMonitor`: ``safety/`` scalars only when the probe set has safety items, and a
    TensorBoard custom-scalars layout written once per run (each metric with every lens on one chart; per lens,
    each metric by family).

    Args:
        pairs: probe pairs (built-in name, JSONL path, or ``MinimalPair`` sequence).
        tokenizer: the tokenizer; default the Trainer's ``processing_class``, else the tokenizer saved with the
            model (``AutoTokenizer.from_pretrained(model.name_or_path, local_files_only=True)``).
        every_n_steps: probe every N optimizer steps, plus once before training.
        lenses: lens names.
        batch_size: contexts per probe forward.
        window: dip window.
        prompt: prompt style.
        figures_every: log figures and histograms on every k-th probe only (scalars go out every probe).
        causal_every: read the ``"causal"`` lens on every k-th probe only, the other lenses every probe.
        history_file: JSON history written into ``args.output_dir`` at the end of training (strict JSON, non-finite
            values as ``null``, written atomically by :func:`dipreg.artifacts.write_json`).
        log_dir: TensorBoard folder (default: the Trainer's, see the module docstring).

    Example::

        trainer = transformers.Trainer(model=model, args=args, train_dataset=ds,
                                       callbacks=[DipMonitorCallback("core", tokenizer=tok, every_n_steps=15)])
    """

    def __init__(
        self,
        pairs: str | Sequence[MinimalPair] = "core",
        tokenizer: Any = None,
        every_n_steps: int = 15,
        lenses: Sequence[str] = ("logit", "causal"),
        *,
        batch_size: int = 16,
        window: tuple[float, float] = DEFAULT_WINDOW,
        prompt: str = "auto",
        figures_every: int = 1,
        causal_every: int = 1,
        history_file: str = "dip_history.json",
        log_dir: str | None = None,
    ) -> None:
        self.every_n_steps = positive_int("every_n_steps", every_n_steps)
        self.schedule = ProbeSchedule(tuple(lenses), causal_every=causal_every, figures_every=figures_every)
        self.tokenizer = tokenizer
        self.probe = DipProbe(resolve_pairs(pairs), lenses, batch_size=batch_size, window=window, prompt=prompt)
        self.history_file = history_file
        self.log_dir = log_dir
        self.history: list[dict[str, float]] = []
        self.writer: SummaryWriter | None = None

    def _tokenizer(self, kwargs: dict[str, Any]) -> Any:
        """``tokenizer=``, else the Trainer's ``processing_class`` (or ``tokenizer``), else the tokenizer saved where
        the model was loaded from (its ``name_or_path``, local files only), as the Lightning monitor finds it."""
        tokenizer = self.tokenizer or kwargs.get("processing_class") or kwargs.get("tokenizer")
        if tokenizer is not None:
            return tokenizer
        loaded, why_not = _tokenizer_from_model(kwargs.get("model"))
        if loaded is None:
            raise MonitorSetupError(
                "DipMonitorCallback needs a tokenizer and found none. Tried: the tokenizer= argument (not given); "
                f"the Trainer's processing_class (not given); {why_not}. Pass tokenizer=... or processing_class=..., "
                "or save the tokenizer next to the model (tokenizer.save_pretrained(path))."
            )
        self.tokenizer = loaded
        return loaded

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Audit the pairs, open the writer and write the custom-scalars layout, and probe once before the first
        step."""
        self.probe.check(self._tokenizer(kwargs))
        if state.is_world_process_zero:
            self.writer = SummaryWriter(log_dir=self._log_dir(args))
            self.writer.add_custom_scalars(self.probe.custom_scalars_layout())
        if state.global_step == 0:
            self._probe(args, state, kwargs)

    def _log_dir(self, args: TrainingArguments) -> str:
        return (
            self.log_dir
            or os.environ.get("TENSORBOARD_LOGGING_DIR")
            or getattr(args, "logging_dir", None)
            or str(Path(args.output_dir) / "runs")
        )

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Probe every ``every_n_steps`` optimizer steps."""
        if state.global_step % self.every_n_steps == 0:
            self._probe(args, state, kwargs)

    def _probe(self, args: TrainingArguments, state: TrainerState, kwargs: dict[str, Any]) -> None:
        model = kwargs["model"]
        index = len(self.history)
        lenses = self.schedule.lenses_for(index)
        result = self.probe.run(model, self._tokenizer(kwargs), args.process_index, args.world_size, lenses)
        step = state.global_step
        self.history.append({"step": float(step), **result.scalars})
        if self.writer is None:
            return
        for key, value in result.scalars.items():
            self.writer.add_scalar(key, value, step)
        if self.schedule.figures_for(index):
            for lens, traj in result.local.items():
                self.writer.add_histogram(f"dip/{lens}/max_wrong_dip_items", traj.max_wrong_dip, step)
            self.writer.add_figure("dip/trajectories", trajectory_figure(result.local), step, close=True)
            self.writer.add_figure("dip/history", history_figure(self.history, self.probe.lenses), step, close=True)
        self.writer.flush()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Write the JSON history (strict JSON: a NaN of a diverged model is ``null``; atomic) and close the writer."""
        if state.is_world_process_zero:
            out = Path(args.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            write_json(out / self.history_file, {"lenses": list(self.probe.lenses), "history": self.history})
        if self.writer is not None:
            self.writer.close()
            self.writer = None
