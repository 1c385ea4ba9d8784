"""`DipTracker`: the dip monitor for any training loop (plain PyTorch, Fabric, litgpt- or torchtune-style).

It is the one owner of what every monitor does: probing (through :class:`~dipreg.callbacks.probe.DipProbe`), the
cadence (every N steps, the causal lens and figures thinned out), the lens agreement, the history (and its
``state_dict``), the figures and the history JSON. The Lightning :class:`~dipreg.callbacks.DipMonitor` and the HF
Trainer callback are shells over it. It imports no Lightning: a loop that is not a Lightning ``Trainer`` uses it
as it is.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn
from torchmetrics.aggregation import MeanMetric

from dipreg.agreement import item_agreement
from dipreg.artifacts import write_json
from dipreg.callbacks.figures import history_figure, trajectory_figure
from dipreg.callbacks.probe import (
    DipProbe,
    ModelGetter,
    MonitorSetupError,
    ProbeResult,
    ProbeSchedule,
    _tokenizer_from_model,
    find_hf_model,
    positive_int,
    resolve_pairs,
)
from dipreg.callbacks.sinks import Sink, check_sink, write_figures, write_scalars
from dipreg.metrics import DEFAULT_WINDOW
from dipreg.prompting import PromptFormat
from dipreg.stimuli import MinimalPair


@dataclass
class DipReading:
    """One probe of a :class:`DipTracker`.

    Attributes:
        step: the training step it was taken at.
        index: its 0-based number in the run (the history length before it; counts on across a resume).
        scalars: ``dip/<lens>/...`` and ``dip/agreement/...`` values, identical on every rank.
        probe: this rank's per-item trajectories per lens (``probe.local``) and the unreadable-item counts.
        lenses: every lens of the tracker (the history figure draws each).
        history: the tracker's history up to and including this reading.
        figures_due: whether this probe's figures are due (``figures_every``, and ``log_figures`` on).
    """

    step: int
    index: int
    scalars: dict[str, float]
    probe: ProbeResult
    lenses: tuple[str, ...]
    history: list[dict[str, float]] = field(repr=False)
    figures_due: bool = True

    def figures(self) -> dict[str, Figure]:
        """``{"dip/trajectories": ..., "dip/history": ...}``: the mean trajectory per lens now, and accuracy and dip
        over the steps so far. New figures on every call; close them (``matplotlib.pyplot.close``) when done."""
        return {
            "dip/trajectories": trajectory_figure(self.probe.local),
            "dip/history": history_figure(self.history, self.lenses),
        }

    def histograms(self) -> dict[str, Tensor]:
        """``{"dip/<lens>/max_wrong_dip_items": per-item dips}`` of this rank's items."""
        return {f"dip/{lens}/max_wrong_dip_items": traj.max_wrong_dip for lens, traj in self.probe.local.items()}


def _process_group() -> tuple[int, int]:
    """``(rank, world_size)`` of the default ``torch.distributed`` group, ``(0, 1)`` when there is none."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class DipTracker:
    """Probe a model's wrong-dip wherever a training loop wants, keep the history, and optionally log it.

    Build it once with the pairs and lenses; in the loop, ask :meth:`due` with the optimizer step and call
    :meth:`probe` with the model. Each probe returns a :class:`DipReading` (scalars, trajectories, figures on
    demand) and appends its scalars to :attr:`history`. The probe reads the live model in eval mode under no grad
    and restores its mode; it never changes a weight. In a distributed loop (``torch.distributed`` initialised,
    e.g. Fabric) every rank must call :meth:`probe` at the same steps: each measures its shard of the pairs and the
    scalars are reduced over ranks (see :class:`~dipreg.callbacks.probe.DipProbe`); sinks, figures and files are
    written on rank 0 only.

    Scalars (as :class:`~dipreg.callbacks.DipMonitor` logs them): ``dip/<lens>/{accuracy,max_wrong_dip,
    commit_layer_frac,late_binding_rate}`` overall, per family (``family/<name>/``) and for safety items
    (``safety/``, when there are any), plus ``dip/agreement/{spearman,sign}`` when a probe reads both the logit
    and the causal lens. An item whose trajectory cannot be read (a diverged model) makes the means covering it
    NaN, and a ``UserWarning`` says how many items each lens could not read.

    Public methods and attributes (stable):

    - :meth:`next_lenses` ``()``: the lenses the next probe reads;
    - :meth:`due` ``(step)``: whether ``step`` is a probe step (a multiple of ``every_n_steps``) not probed yet;
    - :meth:`probe` ``(model, step, ...)`` -> :class:`DipReading`: probe now, append to the history, log to the sinks;
    - :meth:`finish` ``(model, step, history_file=None)``: the end-of-training probe with every lens (unless ``step``
      was just probed) and the history JSON;
    - :meth:`log` ``(reading, sinks)``: write a reading's scalars (and figures when due) to sinks;
    - :meth:`latest`: the newest value of every scalar over the history;
    - :meth:`write_history` ``(path)``: the history as strict JSON (NaN as ``null``);
    - :meth:`check` ``(tokenizer)``: audit the pairs against a tokenizer now;
    - :meth:`state_dict` / :meth:`load_state_dict`: the history (primitives only) for a checkpoint;
    - :attr:`history` (list of ``{"step": ..., <scalar>: ...}``), :attr:`steps`, :attr:`last_step`,
      :attr:`dip_probe` (the :class:`~dipreg.callbacks.probe.DipProbe`), :attr:`lenses`, :attr:`every_n_steps`.

    Args:
        pairs: probe pairs: a built-in set name, a JSONL path, or a sequence of ``MinimalPair``.
        lenses: lens names to read (``"logit"``, ``"causal"``, ``"tuned"``).
        tokenizer: the model's tokenizer (the pairs are audited against it at once); ``None``: the tokenizer saved
            with the model (``AutoTokenizer.from_pretrained(model.name_or_path, local_files_only=True)``), found at
            the first probe, or the ``tokenizer=`` of :meth:`probe`.
        every_n_steps: :meth:`due` is true every N steps (and at step 0).
        batch_size: contexts per probe forward.
        window: relative-depth window of ``max_wrong_dip``.
        prompt: prompt style of the probe contexts (``"auto"``, ``"raw"``, ``"chat"``, or a ``PromptFormat``).
        causal_every: read the ``"causal"`` lens on every k-th probe only, the other lenses every probe.
        figures_every: figures are due on every k-th probe only.
        log_figures: whether figures are ever due (``False``: scalars only).
        lens_options: keyword options per lens (e.g. ``{"tuned": {"path": ...}}``).
        model: where the HF model is inside the module passed to :meth:`probe`: ``None`` (the first
            ``PreTrainedModel`` submodule, so a PEFT, DDP or Fabric wrapper works as it is), an attribute path, or
            a getter ``fn(module) -> model``.
        sinks: where :meth:`probe` logs each reading (rank 0): a TensorBoard ``SummaryWriter``, a Lightning or
            Fabric logger, a callable ``fn(scalars, step)``, or a sequence of them (see
            :mod:`dipreg.callbacks.sinks`); ``None`` or ``()``: none.
        owner: the name that warnings and errors start with.

    Example::

        from torch.utils.tensorboard import SummaryWriter
        from dipreg.callbacks import DipTracker

        tracker = DipTracker("core", tokenizer=tok, lenses=("logit", "causal"), every_n_steps=15,
                             sinks=SummaryWriter("runs/lora"))
        for step, batch in enumerate(loader):
            if tracker.due(step):
                tracker.probe(model, step)       # -> DipReading: .scalars, .figures()
            loss = model(**batch).loss
            loss.backward(); optimizer.step(); optimizer.zero_grad()
        tracker.finish(model, step + 1, history_file="runs/lora/dip_history.json")
    """

    def __init__(
        self,
        pairs: str | Sequence[MinimalPair] = "core",
        *,
        lenses: Sequence[str] = ("logit", "causal"),
        tokenizer: Any = None,
        every_n_steps: int = 15,
        batch_size: int = 16,
        window: tuple[float, float] = DEFAULT_WINDOW,
        prompt: str | PromptFormat = "auto",
        causal_every: int = 1,
        figures_every: int = 1,
        log_figures: bool = True,
        lens_options: dict[str, dict[str, Any]] | None = None,
        model: ModelGetter = None,
        sinks: Sink | Sequence[Sink] | None = (),
        owner: str = "DipTracker",
    ) -> None:
        self.every_n_steps = positive_int("every_n_steps", every_n_steps)
        positive_int("batch_size", batch_size)
        self.lenses = tuple(lenses)
        self.schedule = ProbeSchedule(self.lenses, causal_every=causal_every, figures_every=figures_every)
        self.dip_probe = DipProbe(
            resolve_pairs(pairs),
            self.lenses,
            batch_size=batch_size,
            window=window,
            prompt=prompt,
            lens_options=lens_options,
        )
        self.log_figures = log_figures
        self.model_getter = model
        self.sinks = [] if sinks is None else list(sinks) if isinstance(sinks, list | tuple) else [sinks]
        for sink in self.sinks:
            check_sink(sink)
        self.owner = owner
        self.tokenizer = tokenizer
        self._audited: Any = None
        if tokenizer is not None:
            self.check(tokenizer)
        #: One ``{"step": float, <scalar>: float, ...}`` per probe, in probe order.
        self.history: list[dict[str, float]] = []
        #: The step of the last probe of this run (``-1`` before any).
        self.last_step = -1
        self._agreement_metrics: dict[str, MeanMetric] = {}

    @property
    def steps(self) -> list[int]:
        """The steps probed so far, in order (a resumed history included)."""
        return [int(h["step"]) for h in self.history]

    def due(self, step: int) -> bool:
        """Whether ``step`` is a multiple of ``every_n_steps`` that has not been probed yet."""
        return step % self.every_n_steps == 0 and step not in self.steps

    def next_lenses(self, *, all_lenses: bool = False) -> tuple[str, ...]:
        """The lenses the next :meth:`probe` reads (``causal_every`` thins out the causal lens)."""
        return self.lenses if all_lenses else self.schedule.lenses_for(len(self.history))

    def check(self, tokenizer: Any) -> None:
        """Audit the pairs against ``tokenizer`` now (every answer one token; errors name every failing item)."""
        self.dip_probe.check(tokenizer)
        self._audited = tokenizer

    def _tokenizer(self, tokenizer: Any, model: nn.Module) -> Any:
        """``tokenizer``, else the tracker's, else the one saved with ``model``; audited the first time it is seen."""
        found = tokenizer if tokenizer is not None else self.tokenizer
        if found is None:
            found, why_not = _tokenizer_from_model(model)
            if found is None:
                raise MonitorSetupError(
                    f"{self.owner} needs a tokenizer and found none. Tried: the tokenizer= argument (not given); "
                    f"{why_not}. Pass tokenizer=... to {self.owner} or to probe(), or save the tokenizer next to the "
                    "model (tokenizer.save_pretrained(path))."
                )
            self.tokenizer = found
        if found is not self._audited:
            self.check(found)
        return found

    def probe(
        self,
        model: nn.Module,
        step: int,
        *,
        tokenizer: Any = None,
        rank: int | None = None,
        world_size: int | None = None,
        root: nn.Module | None = None,
        all_lenses: bool = False,
    ) -> DipReading:
        """Probe ``model`` now, record the scalars under ``step`` and log them to the sinks (rank 0).

        Args:
            model: the model being trained, or any module holding it (see ``model=`` of the tracker).
            step: the training step the reading belongs to.
            tokenizer: the tokenizer for this probe (default: the tracker's).
            rank: this process's rank; ``world_size``: the number of processes (default: ``torch.distributed``'s,
                one process when it is not initialised). Every rank must call ``probe`` at the same steps.
            root: the outermost module a sharding strategy wrapped (default ``model``), whose weights outside the
                decoder blocks are gathered for the probe.
            all_lenses: read every lens, whatever ``causal_every`` says (the end-of-training probe).
        """
        hf_model = find_hf_model(model, self.model_getter)
        group_rank, group_size = _process_group()
        rank = group_rank if rank is None else rank
        world_size = group_size if world_size is None else world_size
        index = len(self.history)
        lenses = self.next_lenses(all_lenses=all_lenses)
        tokenizer = self._tokenizer(tokenizer, hf_model)
        # A probe called inside inference mode (a validation hook, an eval loop) would turn the running metrics'
        # states into inference tensors, which the next probe outside it may not update: measure in normal mode.
        with torch.inference_mode(False):
            result = self.dip_probe.run(
                hf_model, tokenizer, rank, world_size, lenses, root=model if root is None else root
            )
            scalars = {**result.scalars, **self._agreement(result, hf_model)}
        self.last_step = step
        self.history.append({"step": float(step), **scalars})
        unreadable = result.unreadable_message(len(self.dip_probe.pairs))
        if unreadable and rank == 0:
            warnings.warn(f"{self.owner} at step {step}: unreadable trajectories, {unreadable}", UserWarning, 2)
        reading = DipReading(
            step=step,
            index=index,
            scalars=scalars,
            probe=result,
            lenses=self.lenses,
            history=list(self.history),
            figures_due=self.log_figures and self.schedule.figures_for(index),
        )
        if rank == 0 and self.sinks:
            self.log(reading, self.sinks)
        return reading

    def _agreement(self, result: ProbeResult, model: nn.Module) -> dict[str, float]:
        """``dip/agreement/{spearman,sign}`` (:mod:`dipreg.agreement`) when this probe read both the logit and the
        causal lens: per-item means over this rank's items, reduced over ranks (collective, like the probe)."""
        if not {"logit", "causal"} <= set(result.local):
            return {}
        device = next(model.parameters()).device
        window = self.dip_probe.window
        rho, sign = item_agreement(result.local["logit"].did, result.local["causal"].did, window)
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

    def log(self, reading: DipReading, sinks: Sequence[Sink]) -> None:
        """Write ``reading``'s scalars to every sink, and its figures and histograms when they are due. Call on rank
        0 only (the figures are drawn here)."""
        for sink in sinks:
            check_sink(sink)
            write_scalars(sink, reading.scalars, reading.step)
            if reading.figures_due:
                write_figures(sink, reading.figures(), reading.histograms(), reading.step)

    def finish(
        self,
        model: nn.Module,
        step: int,
        *,
        history_file: str | Path | None = None,
        tokenizer: Any = None,
        rank: int | None = None,
        world_size: int | None = None,
        root: nn.Module | None = None,
    ) -> DipReading | None:
        """The end-of-training probe: every lens, unless ``step`` was already probed (then ``None``); then the
        history JSON at ``history_file`` (rank 0), when given. Every rank must call it."""
        reading = None
        if step not in self.steps:
            reading = self.probe(
                model, step, tokenizer=tokenizer, rank=rank, world_size=world_size, root=root, all_lenses=True
            )
        if history_file is not None and (_process_group()[0] if rank is None else rank) == 0:
            self.write_history(history_file)
        return reading

    def latest(self) -> dict[str, float]:
        """The newest value of every scalar over the history (a lens read on some probes only keeps its last
        value), without ``"step"``."""
        out: dict[str, float] = {}
        for entry in self.history:
            out.update({k: v for k, v in entry.items() if k != "step"})
        return out

    def write_history(self, path: str | Path) -> None:
        """Write ``{"lenses": [...], "history": [...]}`` to ``path`` as strict JSON (NaN as ``null``), atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"lenses": list(self.lenses), "history": self.history})

    def state_dict(self) -> dict[str, Any]:
        """The history and the last probed step (primitives only: checkpoints load with ``weights_only=True``)."""
        return {"history": [dict(h) for h in self.history], "last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the history, so that a resumed run continues its curves without gaps or duplicates."""
        self.history = [{k: float(v) for k, v in h.items()} for h in state_dict.get("history", [])]
        self.last_step = int(state_dict.get("last_step", -1))
