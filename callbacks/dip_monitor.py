"""`DipMonitor`: a drop-in Lightning callback that logs the wrong-dip of the model being fine-tuned.

It reads the live model every N optimizer steps (and optionally at validation end) and logs to whatever
loggers the Trainer has; it never changes weights, never joins the training graph, and keeps its history
in the checkpoint so that a resumed run continues its curves.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from dipreg.callbacks.probe import (
    DipProbe,
    ModelGetter,
    ProbeSchedule,
    find_hf_model,
    positive_int,
    resolve_prompt,
    resolve_tokenizer,
)
from dipreg.callbacks.tracker import DipTracker
from dipreg.metrics import DEFAULT_WINDOW
from dipreg.prompting import PromptFormat
from dipreg.stimuli import MinimalPair


class DipMonitor(Callback):
    """Log held-out accuracy, ``max_wrong_dip``, ``commit_layer_frac`` and the late-binding rate per lens.

    A Lightning shell over :class:`~dipreg.callbacks.DipTracker`, which probes, keeps the history and draws.
    Scalars go under ``dip/<lens>/...`` (overall, ``family/<name>/``, and ``safety/`` when the probe set has safety
    items) to every logger, and into ``trainer.callback_metrics`` after each probe (as tensors), so
    ``EarlyStopping(monitor="dip/causal/max_wrong_dip", mode="min")`` and ``ModelCheckpoint(monitor=..., mode="min")``
    can watch them. Two figures (current mean trajectory per lens, and the history of accuracy vs dip over steps),
    sized for TensorBoard's image cards, go to every logger: TensorBoard (``add_figure``, with a histogram of
    per-item dips and, once per run, a custom-scalars layout: each metric on one chart with every lens, and per lens
    each metric by family), W&B (``log_image``), MLflow (``log_figure``, artifacts ``dip/<figure>/step_<step>.png``)
    and, for a logger with no image API (``CSVLogger``), PNG files at ``<log_dir>/dip/<figure>/step_<step>.png``.
    The probe set is sharded across ranks and reduced with torchmetrics, so distributed runs log the same values as
    one process. An item whose trajectory is NaN/infinite or exactly 0 at every layer (a diverged model) counts as
    NaN, so the scalars covering it are logged as NaN (never as a clean-looking 0), and a warning
    (``rank_zero_warn``) says how many items each lens could not read.

    When a probe reads both the logit and the causal lens it also logs the lens agreement (:mod:`dipreg.agreement`):
    ``dip/agreement/spearman`` and ``dip/agreement/sign``, the per-item means over the probe set. At the end of fit
    it probes once more with every lens (``on_train_end``), unless the last step was just probed, so the last
    history entry is always the final weights.

    Args:
        pairs: probe pairs: a built-in set name, a JSONL path, or a sequence of ``MinimalPair``.
        every_n_steps: probe every N optimizer steps (``trainer.global_step``), plus once before training.
        lenses: lens names to read (``"logit"``, ``"causal"``, ``"tuned"``).
        model: where the HF model is: ``None`` (the first ``PreTrainedModel`` submodule), an attribute path,
            or a getter ``fn(pl_module) -> model``.
        tokenizer: the tokenizer; default: ``pl_module.tokenizer``, else the first attribute of ``pl_module`` that is
            a ``PreTrainedTokenizerBase`` (e.g. ``self.tok``), else the tokenizer saved with the HF model
            (``AutoTokenizer.from_pretrained(model.name_or_path, local_files_only=True)``); see
            :func:`~dipreg.callbacks.probe.resolve_tokenizer`.
        on_validation_end: also probe at the end of every validation run (before ``EarlyStopping`` and
            ``ModelCheckpoint`` check it, wherever they stand in the callback list).
        batch_size: contexts per probe forward.
        window: relative-depth window of ``max_wrong_dip``.
        prompt: prompt style for the probe contexts (``"auto"``, ``"raw"``, ``"chat"``, or a
            :class:`~dipreg.prompting.PromptFormat`). ``None`` (the default): the training data's, i.e. the
            ``prompt`` of ``trainer.datamodule`` when it has one (:attr:`dipreg.PairDataModule.prompt`), else
            ``"auto"``; resolved at ``setup`` into :attr:`resolved_prompt` (see
            :func:`~dipreg.callbacks.probe.resolve_prompt`). An explicit style wins over the datamodule's.
        log_figures: log figures and histograms where the logger supports them.
        figures_every: log figures and histograms on every k-th probe only (scalars go out every probe).
        causal_every: read the ``"causal"`` lens on every k-th probe only, the other lenses every probe. The
            causal lens costs about as much as the forward pass the other lenses share.
        history_file: file name of the JSON history written next to the logs at the end of fit (strict JSON:
            a NaN scalar is written as ``null``).
        lens_options: keyword options per lens (e.g. ``{"tuned": {"path": ...}}``).

    Example::

        from dipreg.callbacks import DipMonitor
        trainer = L.Trainer(callbacks=[DipMonitor("core", every_n_steps=15, lenses=("logit", "causal"))])
        trainer.fit(my_lora_module, datamodule)

        # keep the checkpoint with the lowest causal dip (checked at the monitor's probe steps)
        keep = ModelCheckpoint(monitor="dip/causal/max_wrong_dip", mode="min", every_n_train_steps=15)
        trainer = L.Trainer(callbacks=[DipMonitor("core", every_n_steps=15), keep])
    """

    def __init__(
        self,
        pairs: str | Sequence[MinimalPair] = "core",
        every_n_steps: int = 15,
        lenses: Sequence[str] = ("logit", "causal"),
        model: ModelGetter = None,
        tokenizer: Any = None,
        *,
        on_validation_end: bool = False,
        batch_size: int = 16,
        window: tuple[float, float] = DEFAULT_WINDOW,
        prompt: str | None = None,
        log_figures: bool = True,
        figures_every: int = 1,
        causal_every: int = 1,
        history_file: str = "dip_history.json",
        lens_options: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.every_n_steps = positive_int("every_n_steps", every_n_steps)
        self.batch_size = positive_int("batch_size", batch_size)
        self.schedule = ProbeSchedule(tuple(lenses), causal_every=causal_every, figures_every=figures_every)
        self.pairs_spec = pairs
        self.lenses = tuple(lenses)
        self.model_getter = model
        self.tokenizer = tokenizer
        self.probe_on_validation_end = on_validation_end
        self.window = window
        if prompt is not None:
            resolve_prompt(prompt, None, "DipMonitor")  # a bad explicit style fails here, not at setup
        self.prompt = prompt
        #: The prompt format the probe renders with, set at ``setup`` (``prompt``, or the datamodule's).
        self.resolved_prompt: PromptFormat | None = None
        self.log_figures = log_figures
        self.history_file = history_file
        self.lens_options = lens_options or {}
        #: The :class:`~dipreg.callbacks.DipTracker` that probes, keeps the history and logs; built at ``setup``
        #: (the prompt style may come from the datamodule).
        self.tracker: DipTracker | None = None
        self._restored: dict[str, Any] = {}  # a checkpoint's state loaded before setup built the tracker
        self._final_probe = False

    @property
    def probe(self) -> DipProbe | None:
        """The tracker's :class:`~dipreg.callbacks.probe.DipProbe` (``None`` before ``setup``)."""
        return None if self.tracker is None else self.tracker.dip_probe

    @property
    def history(self) -> list[dict[str, float]]:
        """One ``{"step": ..., <scalar>: ...}`` per probe (a resumed run's includes the checkpoint's)."""
        if self.tracker is None:
            return [dict(h) for h in self._restored.get("history", [])]
        return self.tracker.history

    @property
    def last_step(self) -> int:
        """The step of the last probe (``-1`` before any)."""
        if self.tracker is None:
            return int(self._restored.get("last_step", -1))
        return self.tracker.last_step

    @property
    def state_key(self) -> str:
        """Distinguishes monitors with different pairs, cadence or lenses in one checkpoint."""
        pairs = self.pairs_spec if isinstance(self.pairs_spec, str) else f"{len(self.pairs_spec)}pairs"
        return self._generate_state_key(pairs=pairs, every_n_steps=self.every_n_steps, lenses=self.lenses)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Find the model and tokenizer, resolve the prompt style (``prompt=None``: the datamodule's) and audit the
        pairs now, so a misconfiguration never waits for step N."""
        tokenizer = self._tokenizer(pl_module, find_hf_model(pl_module, self.model_getter))
        if self.tracker is None:
            self.resolved_prompt = resolve_prompt(self.prompt, trainer, "DipMonitor")
            self.tracker = DipTracker(
                self.pairs_spec,
                lenses=self.lenses,
                every_n_steps=self.every_n_steps,
                batch_size=self.batch_size,
                window=self.window,
                prompt=self.resolved_prompt,
                causal_every=self.schedule.causal_every,
                figures_every=self.schedule.figures_every,
                log_figures=self.log_figures,
                lens_options=self.lens_options,
                model=self.model_getter,
                owner="DipMonitor",
            )
            self.tracker.load_state_dict(self._restored)
        self.tracker.check(tokenizer)
        if not trainer.loggers:
            rank_zero_warn("DipMonitor: the Trainer has no logger; dips go only to the history JSON.")

    def _tokenizer(self, pl_module: pl.LightningModule, model: Any) -> Any:
        return resolve_tokenizer(self.tokenizer, pl_module, "DipMonitor", model)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the custom-scalars layout (global rank zero), then probe once before the first step; on resume,
        put the checkpoint's last values back into ``trainer.callback_metrics`` instead."""
        if trainer.is_global_zero and self.probe is not None:
            layout = self.probe.custom_scalars_layout()
            for logger in trainer.loggers:
                if hasattr(logger.experiment, "add_custom_scalars"):
                    logger.experiment.add_custom_scalars(layout)
        if trainer.global_step == 0 and not self.history:
            self._probe(trainer, pl_module)
        elif self.tracker is not None:
            _publish(trainer, self.tracker.latest())

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Probe when the optimizer step count reaches a multiple of ``every_n_steps`` (once per step)."""
        if self.tracker is not None and self.tracker.due(trainer.global_step):
            self._probe(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Probe at the end of every validation run when asked to (skipped during the sanity check).

        ``on_validation_epoch_end`` rather than ``on_validation_end``: every callback's epoch-end hook runs before
        any callback's ``on_validation_end``, where ``EarlyStopping`` and ``ModelCheckpoint`` read
        ``trainer.callback_metrics``, so they see this probe wherever the monitor stands in the callback list."""
        if (
            self.probe_on_validation_end
            and not trainer.sanity_checking
            and trainer.global_step not in self.tracker.steps
        ):
            self._probe(trainer, pl_module)

    def _probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.tracker is not None, "setup() did not run"
        tokenizer = self._tokenizer(pl_module, find_hf_model(pl_module, self.model_getter))
        step = trainer.global_step
        lenses = self.tracker.next_lenses(all_lenses=self._final_probe)
        # One line when a probe starts and one when it ends, so a long probe never looks like a hang.
        pairs = len(self.tracker.dip_probe.pairs)
        rank_zero_info(f"DipMonitor: probing at step {step}: {pairs} pairs, lenses {'+'.join(lenses)}")
        start = time.perf_counter()
        reading = self.tracker.probe(
            pl_module,
            step,
            tokenizer=tokenizer,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            root=trainer.model,
            all_lenses=self._final_probe,
        )
        rank_zero_info(f"DipMonitor: probe at step {step} took {time.perf_counter() - start:.1f} s")
        _publish(trainer, reading.scalars)
        if trainer.is_global_zero:  # loggers are dummies on the other ranks, and figures are drawn once
            self.tracker.log(reading, trainer.loggers)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Probe the final weights with every lens (unless the last step was just probed), then write the history
        JSON next to the logs (global rank zero)."""
        if self.tracker is not None and trainer.global_step not in self.tracker.steps:
            self._final_probe = True  # every lens, whatever causal_every says: these are the final numbers
            try:
                self._probe(trainer, pl_module)
            finally:
                self._final_probe = False
        folder = Path(trainer.log_dir or trainer.default_root_dir)  # log_dir broadcasts: every rank asks
        if trainer.is_global_zero and self.tracker is not None:
            self.tracker.write_history(folder / self.history_file)

    def state_dict(self) -> dict[str, Any]:
        """History and the last probed step (primitives only: checkpoints load with weights_only=True)."""
        if self.tracker is None:
            return {"history": self.history, "last_step": self.last_step}
        return self.tracker.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the history so that a resumed run continues the curves without gaps or duplicates."""
        if self.tracker is None:
            self._restored = dict(state_dict)
        else:
            self.tracker.load_state_dict(state_dict)


def _publish(trainer: pl.Trainer, scalars: Mapping[str, float]) -> None:
    """Put ``scalars`` into ``trainer.callback_metrics`` (as float64 CPU tensors), where ``EarlyStopping`` and
    ``ModelCheckpoint(monitor="dip/...")`` read them.

    Written into the dict directly rather than through ``pl_module.log``: the probe of step 0 runs in
    ``on_train_start`` and the final one in ``on_train_end``, where ``self.log`` is refused, and ``self.log`` in a
    validation hook would reduce the value over the validation epoch. No sync is needed under DDP: the probe has
    already reduced the scalars over ranks, so every rank writes the same values and the stopping decision
    ``EarlyStopping`` reduces over ranks is the same everywhere. Lightning clears ``callback_metrics`` only at the
    start of a fit and around the sanity check, both before the first probe."""
    trainer.callback_metrics.update({key: torch.tensor(value, dtype=torch.float64) for key, value in scalars.items()})
