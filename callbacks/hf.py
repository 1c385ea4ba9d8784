"""`DipMonitorCallback`: the dip monitor as a ``transformers.TrainerCallback`` for HF ``Trainer`` and TRL users.

A shell over :class:`~dipreg.callbacks.tracker.DipTracker` (which probes, keeps the history and draws); this module
only connects it to the Trainer:

- scalars go into the Trainer's log as ``Trainer.log`` puts them there: an entry in ``state.log_history`` and an
  ``on_log`` event to every callback, so every ``report_to`` integration (TensorBoard, W&B, MLflow, trackio ...)
  receives them at the probe's ``global_step``;
- figures, per-item histograms and the custom-scalars layout go to TensorBoard: the writer of the Trainer's
  ``TensorBoardCallback`` when ``report_to`` has ``"tensorboard"`` (where its scalars are, under ``train/``), else
  a writer of its own (see :class:`DipMonitorCallback`'s ``log_dir``), which then gets the scalars too;
- the history is saved with every checkpoint (``transformers``' stateful-callback protocol, ``ExportableState``)
  and restored from it on ``resume_from_checkpoint``, so a resumed run continues its curves.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.tensorboard import SummaryWriter
from transformers import (
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import ExportableState

from dipreg.callbacks.probe import MonitorSetupError, _tokenizer_from_model
from dipreg.callbacks.sinks import write_figures, write_scalars
from dipreg.callbacks.tracker import DipReading, DipTracker
from dipreg.metrics import DEFAULT_WINDOW
from dipreg.stimuli import MinimalPair

#: The prefix transformers' ``TensorBoardCallback`` puts before every training log key (``rewrite_logs``).
TENSORBOARD_TRAIN_PREFIX = "train/"


def running_trainer() -> Trainer | None:
    """The ``transformers.Trainer`` (a TRL trainer included) whose callback event is running, or ``None``.

    transformers hands a callback neither the Trainer nor its ``CallbackHandler`` (4.x and 5.x), but the Trainer is
    on the call stack of every event (``Trainer._inner_training_loop`` -> ``CallbackHandler.call_event`` -> the
    callback). The monitor needs it to log as ``Trainer.log`` does and to find the module a sharding strategy
    wrapped (``trainer.model_wrapped``), so it looks it up there, once per ``train()``.
    """
    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, Trainer):
                return owner
            frame = frame.f_back
        return None
    finally:
        del frame  # a frame held in a local makes a reference cycle


def probe_root(trainer: Trainer | None, model: nn.Module) -> nn.Module:
    """The outermost module whose weights a sharding strategy holds: ``trainer.model_wrapped`` (the FSDP wrapper,
    the DeepSpeed engine, DDP), or ``model`` when there is no Trainer. The probe gathers the weights outside the
    decoder blocks from it (:func:`~dipreg.callbacks.sharding.gathered_unembedding`: FSDP1 ``summon_full_params``,
    FSDP2 ``unshard``, DeepSpeed ZeRO-3 ``GatheredParameters``, nothing without sharding)."""
    wrapped = getattr(trainer, "model_wrapped", None)
    return wrapped if isinstance(wrapped, nn.Module) else model


def checkpoint_attributes(state: TrainerState, name: str, arguments: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``"attributes"`` a checkpoint saved for the stateful callback of class ``name`` built with ``arguments``
    (its ``state()["args"]``), read from ``state.stateful_callbacks`` of the state being resumed; ``None`` when the
    checkpoint holds none.

    transformers keeps one entry per callback class, or a list when there are several instances, to which every
    checkpoint appends (5.x): the newest entry whose arguments equal ``arguments`` (compared as they read back from
    ``trainer_state.json``) is returned."""
    saved = (state.stateful_callbacks or {}).get(name)
    entries = saved if isinstance(saved, list) else [saved] if saved else []
    wanted = json.loads(json.dumps(arguments))
    matching = [entry for entry in entries if json.loads(json.dumps(entry.get("args", {}))) == wanted]
    return matching[-1].get("attributes", {}) if matching else None


def _prefixed_layout(layout: dict[str, dict[str, list[Any]]], prefix: str) -> dict[str, dict[str, list[Any]]]:
    """``layout`` (from :meth:`~dipreg.callbacks.probe.DipProbe.custom_scalars_layout`) with every anchored tag
    pattern ``^dip/...$`` read as ``^<prefix>dip/...$``."""
    anchored = "^" + re.escape(prefix)
    return {
        category: {
            title: [kind, [anchored + pattern.removeprefix("^") for pattern in patterns]]
            for title, (kind, patterns) in charts.items()
        }
        for category, charts in layout.items()
    }


class DipMonitorCallback(TrainerCallback, ExportableState):
    """Probe the wrong-dip every N optimizer steps of an HF ``Trainer`` or TRL run and log it with the Trainer's logs.

    The scalars (``dip/<lens>/...`` overall, per family and for safety items, plus ``dip/agreement/spearman`` and
    ``dip/agreement/sign`` when a probe reads both the logit and the causal lens) are the Lightning
    :class:`~dipreg.callbacks.DipMonitor`'s. It probes before the first step, every ``every_n_steps`` steps, and at
    the last step with every lens (when training stops at ``max_steps`` or a callback stops it in ``on_step_end``);
    a run stopped later than that (e.g. by ``EarlyStoppingCallback`` after an evaluation) gets its final probe at
    ``on_train_end``, which reaches ``state.log_history``, the history file and the monitor's own TensorBoard writer
    but not the ``report_to`` integrations (they have closed by then). See the module docstring for where each
    output goes.

    The model is the Trainer's (a PEFT model as TRL builds it with ``peft_config`` included): the probe reads the
    live weights in eval mode under no grad, restores the mode, and needs no change for gradient checkpointing.
    Under DDP, FSDP or DeepSpeed ZeRO-3 (through accelerate) every rank probes its shard of the pairs at the same
    steps, running the same forwards inside the strategy's gathering context, and the scalars are reduced over ranks.

    Args:
        pairs: probe pairs (built-in name, JSONL path, or ``MinimalPair`` sequence; their ``to_dict()`` dicts too,
            which is how a checkpoint stores them).
        every_n_steps: probe every N optimizer steps, plus once before training and at the last step.
        lenses: lens names.
        tokenizer: the tokenizer; default: the Trainer's ``processing_class`` (a tokenizer, or a processor's
            ``.tokenizer``), else the tokenizer saved with the model
            (``AutoTokenizer.from_pretrained(model.name_or_path, local_files_only=True)``).
        batch_size: contexts per probe forward.
        window: dip window.
        prompt: prompt style (``"auto"``, ``"raw"``, ``"chat"``).
        figures_every: log figures and histograms on every k-th probe only (scalars go out every probe).
        causal_every: read the ``"causal"`` lens on every k-th probe only, the other lenses every probe.
        history_file: JSON history written into ``args.output_dir`` at the end of training (strict JSON, non-finite
            values as ``null``, written atomically by :func:`dipreg.artifacts.write_json`).
        log_dir: a TensorBoard folder of the monitor's own for scalars, figures and layout. Default: the Trainer's
            ``TensorBoardCallback`` writer when ``report_to`` has ``"tensorboard"``, else a writer of its own at
            ``$TENSORBOARD_LOGGING_DIR``, else ``args.logging_dir`` (transformers 4), else ``<output_dir>/runs``.

    Example::

        from peft import LoraConfig
        from trl import SFTConfig, SFTTrainer
        from dipreg.callbacks.hf import DipMonitorCallback

        trainer = SFTTrainer(model=model, args=SFTConfig(output_dir="out", report_to=["tensorboard"]),
                             train_dataset=dataset, processing_class=tokenizer, peft_config=LoraConfig(r=16),
                             callbacks=[DipMonitorCallback("core", every_n_steps=15)])
        trainer.train()
    """

    def __init__(
        self,
        pairs: str | Sequence[MinimalPair | Mapping[str, Any]] = "core",
        *,
        every_n_steps: int = 15,
        lenses: Sequence[str] = ("logit", "causal"),
        tokenizer: Any = None,
        batch_size: int = 16,
        window: tuple[float, float] = DEFAULT_WINDOW,
        prompt: str = "auto",
        figures_every: int = 1,
        causal_every: int = 1,
        history_file: str = "dip_history.json",
        log_dir: str | None = None,
    ) -> None:
        if not isinstance(pairs, str):
            pairs = [MinimalPair.from_dict(p) if isinstance(p, Mapping) else p for p in pairs]
        self.tracker = DipTracker(
            pairs,
            lenses=lenses,
            every_n_steps=every_n_steps,
            batch_size=batch_size,
            window=window,
            prompt=prompt,
            causal_every=causal_every,
            figures_every=figures_every,
            owner="DipMonitorCallback",
        )
        self.tokenizer = tokenizer
        self.history_file = history_file
        self.log_dir = log_dir
        # The arguments that rebuild this monitor, JSON-ready: the stateful-callback protocol stores them in every
        # checkpoint and, with `restore_callback_states_from_checkpoint=True`, transformers calls the class with them.
        self._arguments: dict[str, Any] = {
            "pairs": pairs if isinstance(pairs, str) else [p.to_dict() for p in pairs],
            "every_n_steps": every_n_steps,
            "lenses": list(lenses),
            "batch_size": batch_size,
            "window": list(window),
            "prompt": prompt,
            "figures_every": figures_every,
            "causal_every": causal_every,
            "history_file": history_file,
            "log_dir": log_dir,
        }
        self._trainer: Trainer | None = None
        self.writer: SummaryWriter | None = None
        self._own_writer = False

    @property
    def history(self) -> list[dict[str, float]]:
        """One ``{"step": ..., <scalar>: ...}`` per probe, in order (a resumed run's starts with the checkpoint's)."""
        return self.tracker.history

    @history.setter
    def history(self, value: Sequence[Mapping[str, float]]) -> None:
        last_step = int(value[-1]["step"]) if value else -1
        self.tracker.load_state_dict({"history": [dict(h) for h in value], "last_step": last_step})

    def state(self) -> dict[str, Any]:
        """The stateful-callback protocol (``ExportableState``): the constructor arguments and the history, saved in
        each checkpoint's ``trainer_state.json``."""
        return {"args": dict(self._arguments), "attributes": {"history": [dict(h) for h in self.history]}}

    def _tokenizer(self, kwargs: dict[str, Any]) -> Any:
        """``tokenizer=``, else the Trainer's ``processing_class`` when it is a tokenizer or a processor holding one
        (``.tokenizer``), else the tokenizer saved where the model was loaded from (its ``name_or_path``, local files
        only), as the Lightning monitor finds it."""
        if self.tokenizer is not None:
            return self.tokenizer
        processing_class = kwargs.get("processing_class") or kwargs.get("tokenizer")
        for candidate in (processing_class, getattr(processing_class, "tokenizer", None)):
            if isinstance(candidate, PreTrainedTokenizerBase):
                return candidate
        loaded, why_not = _tokenizer_from_model(kwargs.get("model"))
        if loaded is None:
            given = (
                "not given"
                if processing_class is None
                else f"a {type(processing_class).__name__}, neither a tokenizer nor a processor with a .tokenizer"
            )
            raise MonitorSetupError(
                "DipMonitorCallback needs a tokenizer and found none. Tried: the tokenizer= argument (not given); "
                f"the Trainer's processing_class ({given}); {why_not}. Pass tokenizer=... or processing_class=..., "
                "or save the tokenizer next to the model (tokenizer.save_pretrained(path))."
            )
        self.tokenizer = loaded
        return loaded

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl | None:
        """Audit the pairs, restore the history on resume (or start a new one), choose the TensorBoard writer and
        write the custom-scalars layout, and probe once before the first step."""
        self.tracker.check(self._tokenizer(kwargs))
        self._trainer = running_trainer()
        # A resumed run continues the checkpoint's history (none: a checkpoint of a run without this monitor); a
        # run from step 0 starts a new one.
        saved = checkpoint_attributes(state, type(self).__name__, self._arguments) if state.global_step else None
        self.history = [h for h in (saved or {}).get("history", []) if h["step"] <= state.global_step]
        if state.is_world_process_zero:
            self._open_writer(args)
        if state.global_step == 0:
            return self._probe(args, state, control, kwargs, all_lenses=False)
        return None

    def _open_writer(self, args: TrainingArguments) -> None:
        """The TensorBoard writer for figures (and, when it is the monitor's own, scalars), with the layout."""
        callbacks = self._trainer.callback_handler.callbacks if self._trainer is not None else []
        reporter = next((cb for cb in callbacks if isinstance(cb, TensorBoardCallback)), None)
        layout = self.tracker.dip_probe.custom_scalars_layout()
        if self.log_dir is None and reporter is not None and reporter.tb_writer is not None:
            self.writer, self._own_writer = reporter.tb_writer, False
            layout = _prefixed_layout(layout, TENSORBOARD_TRAIN_PREFIX)
        else:
            folder = (
                self.log_dir
                or os.environ.get("TENSORBOARD_LOGGING_DIR")
                or getattr(args, "logging_dir", None)
                or str(Path(args.output_dir) / "runs")
            )
            self.writer, self._own_writer = SummaryWriter(log_dir=folder), True
        self.writer.add_custom_scalars(layout)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl | None:
        """Probe every ``every_n_steps`` optimizer steps, and at the last step with every lens."""
        step = state.global_step
        last = control.should_training_stop or step >= state.max_steps
        if self.tracker.due(step) or (last and step not in self.tracker.steps):
            return self._probe(args, state, control, kwargs, all_lenses=last)
        return None

    def _probe(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        kwargs: dict[str, Any],
        *,
        all_lenses: bool,
        to_integrations: bool = True,
    ) -> TrainerControl | None:
        model = kwargs["model"]
        reading = self.tracker.probe(
            model,
            state.global_step,
            tokenizer=self._tokenizer(kwargs),
            rank=args.process_index,
            world_size=args.world_size,
            root=probe_root(self._trainer, model),
            all_lenses=all_lenses,
        )
        return self._publish(reading, args, state, control, to_integrations=to_integrations)

    def _publish(
        self,
        reading: DipReading,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        *,
        to_integrations: bool,
    ) -> TrainerControl | None:
        """Log ``reading`` as ``Trainer.log`` logs (``state.log_history`` and every callback's ``on_log``, when
        ``to_integrations``), and write its figures (and, to the monitor's own writer, its scalars) to TensorBoard.

        ``Trainer.log`` itself is not called: TRL's trainers override it to fold their running training metrics
        into the entry and clear them, which would move those metrics off their own logging steps."""
        state.log_history.append({**reading.scalars, "step": reading.step})
        new_control = None
        if to_integrations and self._trainer is not None:
            new_control = self._trainer.callback_handler.on_log(args, state, control, dict(reading.scalars))
        if state.is_world_process_zero and self.writer is not None:
            if self._own_writer:
                write_scalars(self.writer, reading.scalars, reading.step)
            if reading.figures_due:
                write_figures(self.writer, reading.figures(), reading.histograms(), reading.step)
        return new_control

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Probe the final weights with every lens unless the last step was probed, write the JSON history (strict
        JSON: a NaN of a diverged model is ``null``; atomic) and close the monitor's own writer."""
        if not self._own_writer:
            self.writer = None  # the TensorBoardCallback has closed its writer: its on_train_end came first
        if kwargs.get("model") is not None and state.global_step not in self.tracker.steps:
            self._probe(args, state, control, kwargs, all_lenses=True, to_integrations=False)
        if state.is_world_process_zero:
            self.tracker.write_history(Path(args.output_dir) / self.history_file)
        if self.writer is not None and self._own_writer:
            self.writer.close()
        self.writer = None
        self._trainer = None
