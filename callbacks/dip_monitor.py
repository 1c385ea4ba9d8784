"""`DipMonitor`: a drop-in Lightning callback that logs the wrong-dip of the model being fine-tuned.

It reads the live model every N optimizer steps (and optionally at validation end) and logs to whatever
loggers the Trainer has; it never changes weights, never joins the training graph, and keeps its history
in the checkpoint so that a resumed run continues its curves.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchmetrics.aggregation import MeanMetric

from dipreg.agreement import item_agreement
from dipreg.artifacts import write_json
from dipreg.callbacks.figures import history_figure, trajectory_figure
from dipreg.callbacks.probe import (
    DipProbe,
    ModelGetter,
    ProbeResult,
    ProbeSchedule,
    find_hf_model,
    positive_int,
    resolve_pairs,
    resolve_prompt,
    resolve_tokenizer,
)
from dipreg.metrics import DEFAULT_WINDOW
from dipreg.prompting import PromptFormat
from dipreg.stimuli import MinimalPair


class DipMonitor(Callback):
    """Log held-out accuracy, ``max_wrong_dip``, ``commit_layer_frac`` and the late-binding rate per lens.

    Scalars go under ``dip/<lens>/...`` (overall, ``family/<name>/``, and ``safety/`` when the probe set has safety
    items) to every logger; with a TensorBoard logger also, once per run, a custom-scalars layout (each metric on one
    chart with every lens, and per lens each metric by family), a histogram of per-item dips and two figures (current
    mean trajectory per lens, and the history of accuracy vs dip over steps) sized for TensorBoard's image cards.
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
        on_validation_end: also probe at the end of every validation run.
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
    """

    def __init__(
        self,
        pairs: str | Sequence[MinimalPair] = "core",
        *,
        every_n_steps: int = 15,
        lenses: Sequence[str] = ("logit", "causal"),
        model: ModelGetter = None,
        tokenizer: Any = None,
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
        self.probe: DipProbe | None = None
        self.history: list[dict[str, float]] = []
        self.last_step = -1
        self._agreement_metrics: dict[str, MeanMetric] = {}
        self._final_probe = False

    @property
    def state_key(self) -> str:
        """Distinguishes monitors with different pairs, cadence or lenses in one checkpoint."""
        pairs = self.pairs_spec if isinstance(self.pairs_spec, str) else f"{len(self.pairs_spec)}pairs"
        return self._generate_state_key(pairs=pairs, every_n_steps=self.every_n_steps, lenses=self.lenses)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Find the model and tokenizer, resolve the prompt style (``prompt=None``: the datamodule's) and audit the
        pairs now, so a misconfiguration never waits for step N."""
        tokenizer = self._tokenizer(pl_module, find_hf_model(pl_module, self.model_getter))
        if self.probe is None:
            self.resolved_prompt = resolve_prompt(self.prompt, trainer, "DipMonitor")
            self.probe = DipProbe(
                resolve_pairs(self.pairs_spec),
                self.lenses,
                batch_size=self.batch_size,
                window=self.window,
                prompt=self.resolved_prompt,
                lens_options=self.lens_options,
            )
        self.probe.check(tokenizer)
        if not trainer.loggers:
            rank_zero_warn("DipMonitor: the Trainer has no logger; dips go only to the history JSON.")

    def _tokenizer(self, pl_module: pl.LightningModule, model: Any) -> Any:
        return resolve_tokenizer(self.tokenizer, pl_module, "DipMonitor", model)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the custom-scalars layout (global rank zero), then probe once before the first step (not again on
        resume)."""
        if trainer.is_global_zero and self.probe is not None:
            layout = self.probe.custom_scalars_layout()
            for logger in trainer.loggers:
                if hasattr(logger.experiment, "add_custom_scalars"):
                    logger.experiment.add_custom_scalars(layout)
        if trainer.global_step == 0 and not self.history:
            self._probe(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Probe when the optimizer step count reaches a multiple of ``every_n_steps`` (once per step)."""
        step = trainer.global_step
        if step % self.every_n_steps == 0 and step != self.last_step and step not in self._steps_done():
            self._probe(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Probe at validation end when asked to (skipped during the sanity check)."""
        if (
            self.probe_on_validation_end
            and not trainer.sanity_checking
            and trainer.global_step not in self._steps_done()
        ):
            self._probe(trainer, pl_module)

    def _steps_done(self) -> set[int]:
        return {int(h["step"]) for h in self.history}

    def _probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.probe is not None, "setup() did not run"
        model = find_hf_model(pl_module, self.model_getter)
        index = len(self.history)
        lenses = self.lenses if self._final_probe else self.schedule.lenses_for(index)
        tokenizer = self._tokenizer(pl_module, model)
        step = trainer.global_step
        # One line when a probe starts and one when it ends, so a long probe never looks like a hang.
        rank_zero_info(f"DipMonitor: probing at step {step}: {len(self.probe.pairs)} pairs, lenses {'+'.join(lenses)}")
        start = time.perf_counter()
        result = self.probe.run(model, tokenizer, trainer.global_rank, trainer.world_size, lenses, root=trainer.model)
        rank_zero_info(f"DipMonitor: probe at step {step} took {time.perf_counter() - start:.1f} s")
        self.last_step = step
        result.scalars.update(self._agreement(result, model))
        self.history.append({"step": float(step), **result.scalars})
        unreadable = result.unreadable_message(len(self.probe.pairs))
        if unreadable:
            rank_zero_warn(f"DipMonitor at step {step}: unreadable trajectories, {unreadable}")
        for logger in trainer.loggers:
            logger.log_metrics(result.scalars, step=step)
        if trainer.is_global_zero and self.log_figures and self.schedule.figures_for(index):
            self._log_figures(trainer, result, step)

    def _agreement(self, result: ProbeResult, model: Any) -> dict[str, float]:
        """``dip/agreement/{spearman,sign}`` (:mod:`dipreg.agreement`) when this probe read both the logit and the
        causal lens: per-item means over this rank's items, reduced over ranks (collective, like the probe)."""
        if not {"logit", "causal"} <= set(result.local):
            return {}
        device = next(model.parameters()).device
        rho, sign = item_agreement(result.local["logit"].did, result.local["causal"].did, self.window)
        out = {}
        for name, values in (("spearman", rho), ("sign", sign)):
            metric = self._agreement_metrics.setdefault(name, MeanMetric(nan_strategy="ignore")).to(device)
            kept = torch.tensor([v for v in values if v == v], dtype=torch.float64, device=device)  # NaN: undefined
            if kept.numel():
                metric.update(kept)
            else:  # an empty shard still updates, so that every rank syncs the same metric
                metric.update(torch.zeros(1, dtype=torch.float64, device=device), weight=0.0)
            out[f"dip/agreement/{name}"] = float(metric.compute())
            metric.reset()
        return out

    def _log_figures(self, trainer: pl.Trainer, result: ProbeResult, step: int) -> None:
        writers = [lg.experiment for lg in trainer.loggers if hasattr(lg.experiment, "add_figure")]
        for writer in writers:
            for lens, traj in result.local.items():
                writer.add_histogram(f"dip/{lens}/max_wrong_dip_items", traj.max_wrong_dip, step)
            writer.add_figure("dip/trajectories", trajectory_figure(result.local), step, close=True)
            writer.add_figure("dip/history", history_figure(self.history, self.lenses), step, close=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Probe the final weights with every lens (unless the last step was just probed), then write the history
        JSON next to the logs (global rank zero)."""
        if self.probe is not None and trainer.global_step not in self._steps_done():
            self._final_probe = True  # every lens, whatever causal_every says: these are the final numbers
            try:
                self._probe(trainer, pl_module)
            finally:
                self._final_probe = False
        folder = Path(trainer.log_dir or trainer.default_root_dir)  # log_dir broadcasts: every rank asks
        if trainer.is_global_zero:
            folder.mkdir(parents=True, exist_ok=True)
            write_json(folder / self.history_file, {"lenses": list(self.lenses), "history": self.history})

    def state_dict(self) -> dict[str, Any]:
        """History and the last probed step (primitives only: checkpoints load with weights_only=True)."""
        return {"history": [dict(h) for h in self.history], "last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the history so that a resumed run continues the curves without gaps or duplicates."""
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self.last_step = int(state_dict.get("last_step", -1))
