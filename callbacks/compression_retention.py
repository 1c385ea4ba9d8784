"""`CompressionRetention`: run compression-retention evals on the live model at checkpoints or validation end.

Each degradation from :mod:`dipreg.eval` is applied to the live model inside a ``with`` block and restored
bit-exactly (checked by checksum); under a sharding strategy it is applied to the gathered full matrices and written
back into every rank's shard (:func:`degraded`); the numbers come from the same code as `dipreg degrade`
(:func:`dipreg.eval.stats.operator_result`), so the two always agree. Nothing here touches the
training graph: every measurement runs under ``no_grad`` in eval mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from dipreg.callbacks.probe import (
    ModelGetter,
    MonitorSetupError,
    find_hf_model,
    resolve_pairs,
    resolve_prompt,
    resolve_tokenizer,
)
from dipreg.callbacks.sharding import FullWeights, all_ranks_agree, gathered_unembedding, local_checksum
from dipreg.eval.degradation.operators import RestoreError, degrade, get_operator, op_label, parse_ops
from dipreg.eval.degradation.presets import PRESETS
from dipreg.eval.stats import operator_result
from dipreg.metrics import DEFAULT_WINDOW
from dipreg.prompting import PromptFormat
from dipreg.stimuli import MinimalPair, audit_single_token
from dipreg.trajectory import trajectories

#: What the callback measures without `degradations`: the `retention` preset.
DEFAULT_DEGRADATIONS = PRESETS["retention"]


@contextlib.contextmanager
def degraded(model: nn.Module, weights: FullWeights, op: str, **params: Any) -> Iterator[None]:
    """:func:`~dipreg.eval.degrade` ``(model, op, verify=True)`` that also works when a strategy shards the weights.

    Under sharding the operator is applied to the full matrices (gathered by ``weights``) and the result written
    into every rank's shard; the body runs on the sharded, degraded model; then the matrices are gathered again and
    restored, and the whole-model checksum (:func:`~dipreg.eval.state_checksum`, over the full weights) is checked as
    ``degrade(verify=True)`` does, plus each rank's own shard bytes (:func:`~dipreg.callbacks.sharding.local_checksum`)
    on every rank. Without sharding it is ``degrade(model, op, verify=True)``. Collective under sharding.

    Raises:
        RestoreError: a rank's shard did not come back bit-exactly (raised on every rank).
    """
    if weights.backend is None:
        with degrade(model, op, verify=True, **params):
            yield
        return
    before = local_checksum(weights.root)
    context = degrade(model, op, verify=True, **params)
    with weights.gathered():
        context.__enter__()
    try:
        yield
    except BaseException as err:
        with weights.gathered():
            if not context.__exit__(type(err), err, err.__traceback__):
                raise
    else:
        with weights.gathered():
            context.__exit__(None, None, None)
    if not all_ranks_agree(local_checksum(weights.root) == before):
        raise RestoreError(f"{op_label(op, params)} did not restore every rank's shard of the weights bit-exactly.")


class CompressionRetention(Callback):
    """Log retention accuracy and dip-stratified flips of the live model under each degradation.

    Scalars under ``retention/``: ``intact_accuracy`` and, per degradation label, ``accuracy``, ``flips``,
    ``dip_high_flip_rate``, ``dip_low_flip_rate``, ``dip_mw_p`` (Mann–Whitney p, dying vs surviving dip).
    Every rank measures every pair, so every rank runs the same forwards; under DDP no collective is called. Under
    FSDP or DeepSpeed ZeRO-3 the unembedding is read inside the strategy's full-parameter context and every
    degradation acts on the gathered full matrices (:func:`degraded`): every rank must evaluate, and each needs
    the memory of one full copy of the weights while they are gathered. Loggers write on rank zero.

    Args:
        pairs: evaluation pairs: a built-in set name, a JSONL path, or a sequence of ``MinimalPair``.
        degradations: a `dipreg degrade --ops` spec string or a list of ``(op, params)``.
        on: ``"checkpoint"`` (whenever a checkpoint is saved) or ``"validation_end"``.
        model: where the HF model is (see :class:`~dipreg.callbacks.DipMonitor`).
        tokenizer: the tokenizer; found as :class:`~dipreg.callbacks.DipMonitor` finds it when not given
            (``pl_module.tokenizer``, another tokenizer attribute, or the one saved with the HF model).
        batch_size: contexts per forward.
        window: dip window for the stratification.
        prompt: prompt style for the contexts (``"auto"``, ``"raw"``, ``"chat"``, or a
            :class:`~dipreg.prompting.PromptFormat`). ``None`` (the default): the ``prompt`` of
            ``trainer.datamodule`` when it has one (:attr:`dipreg.PairDataModule.prompt`), else ``"auto"``; resolved
            at ``setup`` into :attr:`resolved_prompt`. An explicit style wins over the datamodule's.

    Example::

        trainer = L.Trainer(callbacks=[CompressionRetention("core", "late_svd:rank=64,rtn:bits=3")])
    """

    def __init__(
        self,
        pairs: str | Sequence[MinimalPair] = "core",
        degradations: str | Sequence[tuple[str, dict[str, Any]]] = DEFAULT_DEGRADATIONS,
        on: Literal["checkpoint", "validation_end"] = "checkpoint",
        model: ModelGetter = None,
        tokenizer: Any = None,
        *,
        batch_size: int = 16,
        window: tuple[float, float] = DEFAULT_WINDOW,
        prompt: str | None = None,
    ) -> None:
        if on not in ("checkpoint", "validation_end"):
            raise MonitorSetupError(f"on must be 'checkpoint' or 'validation_end', got {on!r}.")
        self.specs = (
            parse_ops(degradations) if isinstance(degradations, str) else [(n, dict(p)) for n, p in degradations]
        )
        for name, params in self.specs:
            get_operator(name).validate(dict(params))
        self.pairs_spec = pairs
        self.on = on
        self.model_getter = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.window = window
        if prompt is not None:
            resolve_prompt(prompt, None, "CompressionRetention")  # a bad explicit style fails here, not at setup
        self.prompt = prompt
        #: The prompt format the contexts are rendered with, set at ``setup`` (``prompt``, or the datamodule's).
        #: Outside a Trainer (:meth:`evaluate` before any ``setup``) ``prompt`` itself, ``None`` meaning ``"auto"``.
        self.resolved_prompt: PromptFormat | None = None
        self.pairs: list[MinimalPair] = []
        self.history: list[dict[str, float]] = []

    @property
    def state_key(self) -> str:
        """Distinguishes instances with different pairs, degradations or triggers."""
        pairs = self.pairs_spec if isinstance(self.pairs_spec, str) else f"{len(self.pairs_spec)}pairs"
        labels = ",".join(op_label(n, p) for n, p in self.specs)
        return self._generate_state_key(pairs=pairs, degradations=labels, on=self.on)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Find the model and tokenizer, resolve the prompt style (``prompt=None``: the datamodule's) and audit the
        pairs before the first step."""
        self.resolved_prompt = resolve_prompt(self.prompt, trainer, "CompressionRetention")
        tokenizer = self._tokenizer(pl_module, find_hf_model(pl_module, self.model_getter))
        self.pairs = resolve_pairs(self.pairs_spec)
        audit_single_token(self.pairs, tokenizer)

    def _tokenizer(self, pl_module: pl.LightningModule, model: Any) -> Any:
        return resolve_tokenizer(self.tokenizer, pl_module, "CompressionRetention", model)

    @torch.no_grad()
    def evaluate(self, pl_module: pl.LightningModule, root: nn.Module | None = None) -> dict[str, float]:
        """Measure the intact model, then each degradation; return the scalars (also usable outside a Trainer).

        ``root``: the outermost module a sharding strategy wrapped (``trainer.model``; default ``pl_module``)."""
        model = find_hf_model(pl_module, self.model_getter)
        tokenizer = self._tokenizer(pl_module, model)
        prompt = self.resolved_prompt or resolve_prompt(self.prompt, None, "CompressionRetention")
        root = pl_module if root is None else root

        def measure():
            with gathered_unembedding(root, model):
                return trajectories(
                    model, tokenizer, self.pairs, batch_size=self.batch_size, window=self.window, prompt=prompt
                )

        intact = measure()
        scalars = {"retention/intact_accuracy": float(intact.correct.float().mean())}
        weights = FullWeights(root)
        for name, params in self.specs:
            label = op_label(name, params)
            with degraded(model, weights, name, tokenizer=tokenizer, **params):
                after = measure()
            result = operator_result(intact, after)
            dip = result["stratification"]["dip"]
            scalars |= {
                f"retention/{label}/accuracy": result["accuracy"],
                f"retention/{label}/flips": float(result["n_flips"]),
                f"retention/{label}/dip_high_flip_rate": float(dip["high_tertile_flip_rate"]),
                f"retention/{label}/dip_low_flip_rate": float(dip["low_tertile_flip_rate"]),
                f"retention/{label}/dip_mw_p": float(dip["mw_p"]),
                f"retention/{label}/margin_mw_p": float(result["stratification"]["margin"]["mw_p"]),
            }
        return scalars

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if any(int(h["step"]) == step for h in self.history):
            return
        scalars = self.evaluate(pl_module, trainer.model)
        self.history.append({"step": float(step), **scalars})
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Evaluate when a checkpoint is written (``on="checkpoint"``)."""
        if self.on == "checkpoint":
            self._run(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Evaluate after validation (``on="validation_end"``), never during the sanity check."""
        if self.on == "validation_end" and not trainer.sanity_checking:
            self._run(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        """The retention history (primitives only)."""
        return {"history": [dict(h) for h in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the retention history on resume."""
        self.history = [dict(h) for h in state_dict.get("history", [])]
