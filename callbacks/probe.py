"""The dip probe shared by the Lightning and the HF Trainer monitors: measure, reduce across ranks, summarise.

It measures the live model (eval mode and no grad for the call, previous mode restored by
:func:`dipreg.trajectories`) and never writes to a logger itself: the callbacks do that.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.aggregation import MeanMetric, SumMetric
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from dipreg.adapter import ModelAdapter
from dipreg.batching import shared_prefix_length, tokenize_contexts
from dipreg.callbacks.sharding import gathered_unembedding
from dipreg.metrics import DEFAULT_WINDOW, unreadable_items
from dipreg.prompting import PROMPT_STYLES, PromptFormat
from dipreg.stimuli import MinimalPair, audit_single_token, load_pairs
from dipreg.trajectory import LATE_BINDING_DEPTH, Trajectories, trajectories_by_lens
from dipreg.validation import validate_window

ModelGetter = str | Callable[[nn.Module], nn.Module] | None

#: The per-item statistics a probe averages (``dip/<lens>/[<subset>/]<statistic>``), each with its chart title.
STATISTICS: dict[str, str] = {
    "accuracy": "held-out accuracy",
    "max_wrong_dip": "mean max_wrong_dip",
    "commit_layer_frac": "mean commit_layer_frac",
    "late_binding_rate": "late-binding rate",
}


class MonitorSetupError(ValueError):
    """The monitor cannot run on this module or with these pairs; the message says what to change."""


def find_hf_model(module: nn.Module, getter: ModelGetter = None) -> nn.Module:
    """The HF causal LM inside ``module``: the first ``PreTrainedModel`` submodule, an attribute path, or a getter."""
    if callable(getter):
        found = getter(module)
    elif isinstance(getter, str):
        try:
            found = operator.attrgetter(getter)(module)
        except AttributeError as err:
            raise MonitorSetupError(f"{type(module).__name__} has no attribute {getter!r} (model=...).") from err
    else:
        found = next((m for m in module.modules() if isinstance(m, PreTrainedModel)), None)
        if found is None:
            raise MonitorSetupError(
                f"No Hugging Face PreTrainedModel found inside {type(module).__name__}. Hold the HF causal LM "
                "as a submodule, or pass model='attribute.path' or a getter function to the monitor."
            )
    ModelAdapter(found)  # raises UnsupportedModelError naming the class
    return found


def resolve_tokenizer(explicit: Any, module: nn.Module, owner: str, model: nn.Module | None = None) -> Any:
    """The tokenizer ``owner`` uses, found in this order:

    1. ``explicit`` (the callback's ``tokenizer=`` argument), when given;
    2. ``module.tokenizer``, then every other attribute of ``vars(module)`` in name order, the first that is a
       ``transformers.PreTrainedTokenizerBase`` (so a module keeping it as ``self.tok`` works);
    3. ``AutoTokenizer.from_pretrained(model.name_or_path, local_files_only=True)``: the tokenizer saved with the
       HF ``model`` (its ``name_or_path``, i.e. ``config._name_or_path``), from a local folder or the HF cache,
       never the network.

    Raises:
        MonitorSetupError: nothing was found; the message lists every place tried and why each failed.
    """
    if explicit is not None:
        return explicit
    tried = ["the tokenizer= argument (not given)"]
    name = type(module).__name__
    named = getattr(module, "tokenizer", None)
    if isinstance(named, PreTrainedTokenizerBase):
        return named
    what = "absent" if named is None else f"a {type(named).__name__}, not a PreTrainedTokenizerBase"
    tried.append(f"{name}.tokenizer ({what})")
    others = sorted(key for key in vars(module) if key != "tokenizer" and not key.startswith("__"))
    for key in others:
        if isinstance(vars(module)[key], PreTrainedTokenizerBase):
            return vars(module)[key]
    public = [key for key in others if not key.startswith("_")]
    listed = ", ".join(public) if public else "none"
    tried.append(
        f"the other attributes of {name} ({listed}; and {len(others) - len(public)} private ones): "
        "none is a transformers PreTrainedTokenizerBase"
    )
    loaded, why_not = _tokenizer_from_model(model)
    if loaded is not None:
        return loaded
    tried.append(why_not)
    raise MonitorSetupError(
        f"{owner} needs a tokenizer and found none. Tried: {'; '.join(tried)}. Pass tokenizer=..., keep it on the "
        "module (self.tokenizer = tokenizer), or save it next to the model (tokenizer.save_pretrained(path))."
    )


def _tokenizer_from_model(model: nn.Module | None) -> tuple[PreTrainedTokenizerBase | None, str]:
    """``(tokenizer, "")`` saved where ``model`` was loaded from, or ``(None, what was tried and why it failed)``."""
    if model is None:
        return None, "AutoTokenizer.from_pretrained on the model's name_or_path (skipped: no model)"
    path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not path:
        return None, (
            f"AutoTokenizer.from_pretrained on the model's name_or_path (skipped: the {type(model).__name__} has "
            "an empty name_or_path, e.g. it was built from a config)"
        )
    try:
        return _local_tokenizer(str(path)), ""
    except Exception as err:  # the last resort's failure, whatever it is, goes into the error message
        reason = f"{type(err).__name__}: {' '.join(str(err).split()).rstrip('.')}"
        return None, f"AutoTokenizer.from_pretrained({str(path)!r}, local_files_only=True) failed ({reason})"


@functools.lru_cache(maxsize=4)
def _local_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The tokenizer at ``path`` (a folder or a name in the HF cache), loaded once; never downloads."""
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def resolve_prompt(prompt: str | PromptFormat | None, trainer: Any, owner: str) -> PromptFormat:
    """The prompt format ``owner`` renders its contexts with, resolved at ``setup``.

    An explicit ``prompt`` (a style name or a :class:`~dipreg.prompting.PromptFormat`) wins. ``None`` means the
    training data's format: the ``prompt`` attribute of ``trainer.datamodule`` (e.g.
    :attr:`dipreg.PairDataModule.prompt`), when the trainer has a datamodule with one that is a ``PromptFormat``
    or a style name (``"auto"``, ``"raw"``, ``"chat"``); otherwise ``"auto"`` (chat when the tokenizer has a chat
    template), with a warning when the datamodule's ``prompt`` is something else.

    Raises:
        MonitorSetupError: an explicit ``prompt`` that is not a known style.
    """
    if prompt is not None:
        if isinstance(prompt, PromptFormat):
            return prompt
        if prompt not in PROMPT_STYLES:
            raise MonitorSetupError(
                f"{owner}: prompt must be one of {', '.join(PROMPT_STYLES)} or None (the datamodule's), got {prompt!r}."
            )
        return PromptFormat(prompt)
    datamodule = getattr(trainer, "datamodule", None)
    found = getattr(datamodule, "prompt", None)
    if isinstance(found, PromptFormat):
        return found
    if isinstance(found, str) and found in PROMPT_STYLES:
        return PromptFormat(found)
    if found is not None:
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(
            f"{owner}: {type(datamodule).__name__}.prompt is {found!r}, not a prompt style "
            f"({', '.join(PROMPT_STYLES)}) or a PromptFormat; probing with prompt='auto'. Pass prompt=... to choose."
        )
    return PromptFormat("auto")


def resolve_pairs(pairs: str | Sequence[MinimalPair]) -> list[MinimalPair]:
    """Pairs from a built-in name, a JSONL path, or a sequence of :class:`MinimalPair`."""
    loaded = load_pairs(pairs) if isinstance(pairs, str) else list(pairs)
    if not loaded:
        raise MonitorSetupError("The monitor needs at least one minimal pair.")
    return loaded


def positive_int(name: str, value: object) -> int:
    """``value`` when it is a positive integer; a :class:`MonitorSetupError` naming ``name`` otherwise."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise MonitorSetupError(f"{name} must be a positive integer, got {value!r}.")
    return value


@dataclass(frozen=True)
class ProbeSchedule:
    """Which probes read the causal lens and which log figures, counted from the first probe of the run.

    The causal lens costs about as much as the forward pass the other lenses share; figures cost a rendering.
    Probe ``i`` (0-based, the history length, so the count survives a resume) reads the causal lens when
    ``i % causal_every == 0`` and logs figures when ``i % figures_every == 0``; scalars are logged every probe.

    Args:
        lenses: the monitor's lenses.
        causal_every: read the causal lens on every k-th probe only (needs another lens for the others).
        figures_every: log figures and histograms on every k-th probe only.
    """

    lenses: tuple[str, ...]
    causal_every: int = 1
    figures_every: int = 1

    def __post_init__(self) -> None:
        positive_int("causal_every", self.causal_every)
        positive_int("figures_every", self.figures_every)
        if self.causal_every > 1 and set(self.lenses) <= {"causal"}:
            raise MonitorSetupError(
                f"causal_every={self.causal_every} leaves the probes in between with no lens: add another lens "
                "(e.g. lenses=('logit', 'causal')) or set causal_every=1."
            )

    def lenses_for(self, index: int) -> tuple[str, ...]:
        """The lenses probe ``index`` reads."""
        if index % self.causal_every == 0:
            return self.lenses
        return tuple(lens for lens in self.lenses if lens != "causal")

    def figures_for(self, index: int) -> bool:
        """Whether probe ``index`` logs figures."""
        return index % self.figures_every == 0


@dataclass
class ProbeResult:
    """One probe: reduced scalars (identical on every rank), and this rank's trajectories per lens.

    ``item_ids`` are the ids of the pairs this rank measured (its shard, without the padding rows).

    ``non_finite`` and ``all_zero`` count, per lens and over every rank, the items whose DiD trajectory holds a
    NaN/infinity or is exactly 0 at every layer (see :func:`dipreg.metrics.unreadable_items`); their statistics
    entered the scalars as NaN, so a scalar covering such an item is NaN.
    """

    scalars: dict[str, float]
    local: dict[str, Trajectories]
    item_ids: list[str] = field(default_factory=list)
    non_finite: dict[str, int] = field(default_factory=dict)
    all_zero: dict[str, int] = field(default_factory=dict)

    def unreadable_message(self, num_items: int) -> str | None:
        """One line naming how many items each lens could not read (``None`` when every item was readable)."""
        parts = [
            f"{lens}: {self.non_finite.get(lens, 0)} non-finite, {self.all_zero.get(lens, 0)} exactly 0 at every layer"
            for lens in sorted(set(self.non_finite) | set(self.all_zero))
            if self.non_finite.get(lens, 0) or self.all_zero.get(lens, 0)
        ]
        if not parts:
            return None
        return (
            f"{'; '.join(parts)} (of {num_items} probe items). Their accuracy, dip, commit and late-binding values "
            "are NaN, so the means that include them are NaN: the model has probably diverged (residuals that "
            "overflow the final norm read as exactly 0). Lower the learning rate or check the loss."
        )


def _in_subset(pair: MinimalPair, prefix: str) -> bool:
    """Whether ``pair`` belongs to the subset with tag prefix ``prefix`` (``""``, ``family/<f>/``, ``safety/``)."""
    if prefix == "safety/":
        return pair.safety
    if prefix.startswith("family/"):
        return prefix == f"family/{pair.family}/"
    return True


def _first(traj: Trajectories, n: int) -> Trajectories:
    """The first ``n`` items of ``traj`` (the padding rows after them dropped)."""
    return Trajectories(traj.pairs[:n], traj.lens, traj.margin_a[:n], traj.margin_b[:n], traj.window)


def _nan_where(mask: Tensor, values: Tensor) -> Tensor:
    """``values`` as float64 with NaN where ``mask`` is True."""
    return torch.where(mask, torch.full_like(values, float("nan"), dtype=torch.float64), values.double())


class DipProbe:
    """Measures held-out accuracy, dips and commit depths of a model on a pair set, sharded across ranks.

    Each rank measures ``pairs[rank::world_size]``, padded to ``ceil(n / world_size)`` pairs with copies of its
    first pair (:meth:`shard`), so that every rank runs the same number of forwards with the same number of rows:
    under FSDP or DeepSpeed ZeRO-3 every forward gathers weights collectively, and unequal counts would hang. The
    padding rows are measured and dropped before any statistic. The weights outside the decoder blocks (embeddings,
    final norm, unembedding) are read inside the strategy's full-parameter context
    (:func:`~dipreg.callbacks.sharding.gathered_unembedding`). Per-item statistics go into torchmetrics
    ``MeanMetric`` objects whose ``compute()`` reduces across processes, so every rank (and a 1-process run) gets
    the same scalars. Every rank must call :meth:`run` (``compute`` is collective). An item whose trajectory is
    unreadable (non-finite, or exactly 0 at every layer: :func:`dipreg.metrics.unreadable_items`) contributes NaN to
    every statistic, so the means covering it are NaN rather than a number computed without it; the result counts them.
    Scalars cover all items, each family (``family/<name>/``) and the safety items (``safety/``), the last only when
    the pair set has any (:attr:`subsets`): an empty subset would only ever log NaN.

    Args:
        pairs: the probe pairs.
        lenses: lens names (``"logit"``, ``"causal"``, ``"tuned"`` ... as registered in ``dipreg.LENSES``).
        batch_size: contexts per forward.
        window: relative-depth window of ``max_wrong_dip``.
        prompt: prompt style for the contexts (a style name or a :class:`~dipreg.prompting.PromptFormat`).
        lens_options: keyword options per lens name.
    """

    def __init__(
        self,
        pairs: Sequence[MinimalPair],
        lenses: Sequence[str],
        *,
        batch_size: int = 16,
        window: tuple[float, float] = DEFAULT_WINDOW,
        prompt: str | PromptFormat = "auto",
        lens_options: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        if not lenses:
            raise MonitorSetupError("lenses must name at least one lens, e.g. ('logit', 'causal').")
        self.pairs = list(pairs)
        self.lenses = tuple(lenses)
        self.batch_size = batch_size
        self.window = validate_window(window)
        # fewshot draws its worked examples from the whole probe set, never from one rank's shard
        self.prompt = (PromptFormat(prompt) if isinstance(prompt, str) else prompt).with_pool(self.pairs)
        self.lens_options = lens_options or {}
        self.families = sorted({p.family for p in self.pairs})
        # Tag prefixes of the subsets with at least one item ("" = all items): a subset without items would only
        # ever log NaN. Every rank holds the whole pair list, so every rank agrees on them.
        self.subsets = ["", *(f"family/{f}/" for f in self.families)]
        if any(p.safety for p in self.pairs):
            self.subsets.append("safety/")
        self._metrics: dict[str, MeanMetric] = {}
        self._counts: dict[str, SumMetric] = {}
        self._share_prefix: bool | None = None

    def shard(self, rank: int, world_size: int) -> tuple[list[MinimalPair], int]:
        """``(pairs, n_real)``: rank ``rank``'s pairs ``pairs[rank::world_size]`` followed by copies of its first
        pair (of the first pair of the set when the shard is empty) up to ``ceil(n / world_size)`` pairs, the same
        count on every rank; the first ``n_real`` are its own."""
        own = self.pairs[rank::world_size]
        size = -(-len(self.pairs) // world_size)
        filler = own[0] if own else self.pairs[0]
        # The audit refuses repeated ids within one call: each copy gets its own (dropped with the row anyway).
        padding = [dataclasses.replace(filler, id=f"{filler.id}#padding-{k}") for k in range(size - len(own))]
        return own + padding, len(own)

    def share_prefix(self, tokenizer: Any) -> bool:
        """Whether the probe runs the token prefix its contexts share once into a KV cache (one extra forward).

        Decided on the whole pair set, so every rank decides alike: a shard may share a prefix where the whole set
        shares none, and that rank alone would run the extra forward. When the whole set shares a prefix, every
        shard shares at least that one.
        """
        if self._share_prefix is None:
            prompt = PromptFormat(self.prompt) if isinstance(self.prompt, str) else self.prompt
            self._share_prefix = shared_prefix_length(tokenize_contexts(tokenizer, self.pairs, None, prompt)) > 0
        return self._share_prefix

    def custom_scalars_layout(self) -> dict[str, dict[str, list[Any]]]:
        """The TensorBoard custom-scalars layout of the probe's scalars, for ``SummaryWriter.add_custom_scalars``.

        One category holds one chart per statistic with a line per lens (``dip/logit/accuracy`` and
        ``dip/causal/accuracy`` on one chart); then one category per lens holds one chart per statistic with a
        line per subset that has items (all items, each family, the safety items). Each line is the exact tag,
        anchored (TensorBoard matches the tag entries as regular expressions).
        """

        def lines(tags: Sequence[str]) -> list[Any]:
            return ["Multiline", [f"^{re.escape(tag)}$" for tag in tags]]

        layout = {
            "dip: each metric, every lens": {
                title: lines([f"dip/{lens}/{stat}" for lens in self.lenses]) for stat, title in STATISTICS.items()
            }
        }
        for lens in self.lenses:
            layout[f"dip: each metric by family, {lens} lens"] = {
                f"{title} by family ({lens} lens)": lines([f"dip/{lens}/{prefix}{stat}" for prefix in self.subsets])
                for stat, title in STATISTICS.items()
            }
        return layout

    def check(self, tokenizer: Any) -> None:
        """Audit the pairs against the tokenizer now (errors name every failing item)."""
        audit_single_token(self.pairs, tokenizer)

    def _metric(self, key: str, device: torch.device) -> MeanMetric:
        if key not in self._metrics:
            # A NaN item must make the mean NaN: "ignore" would silently average the other items, and "disable"
            # drops the weights (torchmetrics 1.9), breaking the weight-0 update of an empty shard. A float
            # strategy replaces NaN by that float with weight 1, so NaN itself propagates with weights intact.
            self._metrics[key] = MeanMetric(nan_strategy=float("nan"))
        return self._metrics[key].to(device)

    def _count(self, key: str, count: int, device: torch.device) -> int:
        """Add this rank's ``count`` and return the sum over every rank (collective, like ``compute``)."""
        if key not in self._counts:
            self._counts[key] = SumMetric()
        metric = self._counts[key].to(device)
        metric.update(torch.tensor(float(count), dtype=torch.float64, device=device))
        total = int(metric.compute())
        metric.reset()
        return total

    def _update(self, key: str, values: Tensor, device: torch.device) -> None:
        # An empty shard still updates (with weight 0) so that every rank syncs the same set of metrics.
        metric = self._metric(key, device)
        if values.numel():
            metric.update(values.double().to(device))
        else:
            metric.update(torch.zeros(1, dtype=torch.float64, device=device), weight=0.0)

    @torch.no_grad()
    def run(
        self,
        model: nn.Module,
        tokenizer: Any,
        rank: int = 0,
        world_size: int = 1,
        lenses: Sequence[str] | None = None,
        *,
        root: nn.Module | None = None,
    ) -> ProbeResult:
        """Measure this rank's shard under ``lenses`` (default: every lens of the probe), reduce, and return the
        scalars of those lenses. Every rank must pass the same lenses.

        ``root`` is the outermost module a sharding strategy wrapped (``trainer.model``; default ``model``): the
        weights it shards outside the decoder blocks are gathered for the probe."""
        lenses = self.lenses if lenses is None else tuple(lenses)
        unknown = [lens for lens in lenses if lens not in self.lenses]
        if not lenses or unknown:
            raise MonitorSetupError(f"Probe lenses must be a non-empty subset of {self.lenses}, got {lenses}.")
        padded, n_real = self.shard(rank, world_size)
        shard = padded[:n_real]
        device = next(model.parameters()).device
        with gathered_unembedding(model if root is None else root, model):
            measured = trajectories_by_lens(
                model,
                tokenizer,
                padded,
                lenses,
                batch_size=self.batch_size,
                window=self.window,
                prompt=self.prompt,
                lens_options=self.lens_options,
                share_prefix=world_size == 1 or self.share_prefix(tokenizer),
            )
        local = {lens: _first(traj, n_real) for lens, traj in measured.items()}
        non_finite: dict[str, int] = {}
        all_zero: dict[str, int] = {}
        for lens, traj in local.items():
            bad_values, zeros = unreadable_items(traj.did)
            unreadable = bad_values | zeros
            per_item = {
                "accuracy": _nan_where(unreadable, traj.correct.float()),
                "max_wrong_dip": _nan_where(unreadable, traj.max_wrong_dip),
                "commit_layer_frac": _nan_where(unreadable, traj.commit_layer_frac),
                "late_binding_rate": _nan_where(unreadable, (traj.commit_layer_frac >= LATE_BINDING_DEPTH).float()),
            }
            for prefix in self.subsets:
                mask = torch.tensor([_in_subset(p, prefix) for p in shard], dtype=torch.bool)
                for stat, values in per_item.items():
                    self._update(f"dip/{lens}/{prefix}{stat}", values[mask], device)
            non_finite[lens] = self._count(f"{lens}/non_finite", int(bad_values.sum()), device)
            all_zero[lens] = self._count(f"{lens}/all_zero", int(zeros.sum()), device)
        scalars = {}
        for key in sorted(k for k in self._metrics if k.split("/")[1] in local):
            metric = self._metrics[key]
            scalars[key] = float(metric.compute())
            metric.reset()
        return ProbeResult(
            scalars=scalars,
            local=local,
            item_ids=[p.id for p in shard],
            non_finite=non_finite,
            all_zero=all_zero,
        )
