"""`DipRegModule`: LoRA SFT of a causal LM on the answer token, plus pluggable auxiliary losses (paper §6).

One training forward runs the backbone with :meth:`ModelAdapter.capture` at the answer positions; the CE is
computed from the captured last-layer residual (final norm + head, at the answer position only, never B×T×V),
and every auxiliary loss reads the same captured residuals. Checkpoints hold only the trainable adapter weights.
This module trains; measuring held-out trajectories lives in :mod:`dipreg.callbacks.heldout`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_only
from peft import LoraConfig, PeftModel, get_peft_model
from torch import Tensor
from torch.nn.modules.module import _IncompatibleKeys
from torchmetrics.classification import BinaryAccuracy

from dipreg.adapter import ModelAdapter
from dipreg.losses import AuxLoss, BatchView
from dipreg.models import DTYPE_CHOICES, load_model
from dipreg.validation import validate_count, validate_number

__all__ = ["CheckpointMismatchError", "DipRegModule", "late_layers"]


class CheckpointMismatchError(ValueError):
    """A checkpoint's adapter weights do not fit this module (other layers, rank or target modules)."""


def late_layers(num_layers: int, layers: str | float) -> list[int] | None:
    """Layer indices to adapt: ``None`` for ``"all"``, else the last ``ceil(fraction · L)`` layers."""
    if layers == "all":
        return None
    if isinstance(layers, bool):
        raise ValueError(f"layers must be 'all' or a fraction in (0, 1] of the last layers, got {layers!r}.")
    try:
        fraction = float(layers)
    except (TypeError, ValueError) as err:
        raise ValueError(f"layers must be 'all' or a fraction in (0, 1] of the last layers, got {layers!r}.") from err
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"layers={layers!r}: a late fraction must lie in (0, 1] (e.g. 0.25 for the last quarter).")
    count = max(1, math.ceil(fraction * num_layers - 1e-9))
    return list(range(num_layers - count, num_layers))


def _lora_rank(key: str, shape: tuple[int, ...]) -> int | None:
    """The LoRA rank a ``lora_A`` (``(r, in)``) or ``lora_B`` (``(out, r)``) weight of ``shape`` implies."""
    if ".lora_A." in key and len(shape) == 2:
        return shape[0]
    if ".lora_B." in key and len(shape) == 2:
        return shape[1]
    return None


def _mismatch_message(
    missing: list[str], unexpected: list[str], shapes: list[tuple[str, tuple[int, ...], tuple[int, ...]]], hp: Any
) -> str:
    """One line saying how a checkpoint's adapter weights differ from a module's, and what to do."""

    def examples(keys: list[str]) -> str:
        return ", ".join(repr(key)[1:-1] for key in keys[:2]) + (", ..." if len(keys) > 2 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} adapter weight(s) of this module are missing from it (e.g. {examples(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} weight(s) in it have no place in this module (e.g. {examples(unexpected)})")
    if shapes:
        key, got, want = shapes[0]
        ranks = {r for k, g, _ in shapes if (r := _lora_rank(k, g)) is not None}
        rank = f"; the checkpoint has LoRA rank {sorted(ranks)[0]}, this module r={hp.get('r')}" if ranks else ""
        parts.append(
            f"{len(shapes)} weight(s) differ in shape (e.g. {examples([key])}: {got} in the checkpoint vs {want}){rank}"
        )
    settings = ", ".join(f"{k}={hp.get(k)!r}" for k in ("r", "layers", "target_modules"))
    return (
        f"The checkpoint does not match this DipRegModule's LoRA adapter: {'; '.join(parts)}. Build the module with "
        f"the r, layers and target_modules of the run that wrote the checkpoint (this module: {settings})."
    )


class DipRegModule(LightningModule):
    """LoRA fine-tuning on the answer token with auxiliary losses read from the same forward pass.

    Args:
        model_name: HF name or local path; ``None`` is the embedded default (SmolLM2-135M-Instruct).
        r, alpha, dropout: LoRA rank, scaling and dropout.
        target_modules: modules to adapt; ``None`` picks the architecture's
            :attr:`~dipreg.architectures.Architecture.lora_targets`.
        layers: ``"all"`` or a late fraction (``0.25``: LoRA on the last 25 % of layers only).
        aux_losses: auxiliary losses (:class:`~dipreg.losses.AuxLoss`), e.g. ``[WrongMarginHinge(weight=0.2)]``.
        lr, weight_decay: AdamW settings.
        gradient_checkpointing: recompute activations in backward (non-reentrant, LoRA-safe).
        dtype: the frozen base model's dtype when ``model_name`` is loaded: ``"auto"`` (bfloat16 on a GPU, float32
            on a CPU), ``"bfloat16"``, ``"float16"`` or ``"float32"`` (see :func:`dipreg.load_model`).
        model, tokenizer: an already loaded model (used instead of ``model_name``, in its own dtype) and its
            tokenizer.

    The LoRA weights are float32 whatever the base's dtype, and stay float32 under every Lightning precision:
    ``bf16-mixed`` (autocast) and ``bf16-true`` (which converts the module with ``.to(dtype)``; :meth:`to` puts the
    trainable weights back to float32). Margins, the CE and every auxiliary loss are computed in float32.

    Every numeric argument is checked before the model is loaded (``r`` an ``int`` >= 1, where ``True`` is not an
    ``int``; ``alpha`` and ``lr`` finite and > 0; ``dropout`` in [0, 1); ``weight_decay`` >= 0); a ``ValueError``
    names the parameter.

    Checkpoints hold only the LoRA adapter weights (:meth:`state_dict`); :meth:`load_state_dict` requires the
    checkpoint's adapter weights to match this module's exactly and never requires the frozen base model.

    Example:
        >>> from dipreg.losses import WrongMarginHinge
        >>> module = DipRegModule(aux_losses=[WrongMarginHinge(weight=0.2)])  # doctest: +SKIP
        >>> lightning.Trainer(max_steps=60).fit(module, PairDataModule())  # doctest: +SKIP
    """

    strict_loading = False

    def __init__(
        self,
        model_name: str | None = None,
        r: int = 16,
        alpha: int = 32,
        dropout: float = 0.05,
        target_modules: list[str] | None = None,
        layers: str | float = "all",
        aux_losses: list[AuxLoss] | None = None,
        lr: float = 5e-4,
        weight_decay: float = 0.0,
        gradient_checkpointing: bool = False,
        dtype: str = "auto",
        model: Any = None,
        tokenizer: Any = None,
    ) -> None:
        super().__init__()
        validate_count(r, "DipRegModule: r (the LoRA rank)", 1)
        validate_number(alpha, "DipRegModule: alpha (the LoRA scaling)", 0.0, math.inf, low_open=True)
        validate_number(dropout, "DipRegModule: dropout", 0.0, 1.0)
        validate_number(lr, "DipRegModule: lr", 0.0, math.inf, low_open=True)
        validate_number(weight_decay, "DipRegModule: weight_decay", 0.0, math.inf)
        if not isinstance(gradient_checkpointing, bool):
            raise ValueError(
                f"DipRegModule: gradient_checkpointing must be True or False, got {gradient_checkpointing!r}."
            )
        if model_name is not None and not isinstance(model_name, str):
            raise ValueError(f"DipRegModule: model_name must be a string or None, got {model_name!r}.")
        if target_modules is not None and (
            isinstance(target_modules, str)
            or not target_modules
            or not all(isinstance(t, str) and t for t in target_modules)
        ):
            raise ValueError(
                "DipRegModule: target_modules must be None (the architecture's defaults) or a non-empty list of "
                f"module names, got {target_modules!r}."
            )
        self.save_hyperparameters(ignore=["aux_losses", "model", "tokenizer"])
        self.aux_losses: list[AuxLoss] = list(aux_losses or [])
        for loss in self.aux_losses:
            if not isinstance(loss, AuxLoss):
                raise TypeError(
                    f"aux_losses: {loss!r} is not a dipreg.losses.AuxLoss; subclass it (see dipreg.losses)."
                )
        names = [loss.name for loss in self.aux_losses]
        if len(set(names)) != len(names):
            raise ValueError(f"aux_losses: names must be unique (they name the logged metrics), got {names}.")
        if dtype not in DTYPE_CHOICES:
            raise ValueError(f"DipRegModule: dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}.")
        if model is None:
            model, loaded_tok = load_model(model_name, dtype=dtype)
            tokenizer = tokenizer or loaded_tok
        self.tokenizer = tokenizer
        model.config.use_cache = False
        base = ModelAdapter(model)
        to_adapt = late_layers(base.num_layers, layers)
        targets = target_modules or list(base.architecture.lora_targets)
        layers_path = next(name for name, mod in model.named_modules() if mod is base.layers)
        config = LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=targets,
            layers_to_transform=to_adapt,
            layers_pattern=layers_path.rsplit(".", 1)[-1] if to_adapt is not None else None,
            fan_in_fan_out=base.architecture.fan_in_fan_out,
            bias="none",
        )
        self.model: PeftModel = get_peft_model(model, config)  # casts the adapter to float32 on a half base
        self._keep_adapter_float32()
        self.model.train()  # load_model returns eval mode; LoRA dropout must be live while training
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.adapter = ModelAdapter(self.model)
        self.train_acc = BinaryAccuracy()
        self.val_acc = torch.nn.ModuleList()

    def _keep_adapter_float32(self) -> None:
        """Trainable (LoRA) weights in float32: half-precision master weights would lose small updates."""
        for param in self.parameters():
            if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
                param.data = param.data.float()

    def to(self, *args: Any, **kwargs: Any) -> DipRegModule:
        """``nn.Module.to``, except that the trainable (LoRA) weights stay float32 when a dtype is given (Lightning's
        ``bf16-true``/``16-true`` precision converts the whole module this way; the frozen base follows it)."""
        moved = super().to(*args, **kwargs)
        self._keep_adapter_float32()
        return moved

    # -- forward ---------------------------------------------------------------------------------------

    def answer_logits(self, residual: Tensor) -> Tensor:
        """Full-vocabulary logits ``(B, V)`` of last-layer residuals ``(B, D)`` at the answer positions."""
        return self.adapter.vocab_logits(self.adapter.final_norm(residual))

    def losses(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """One backbone forward; returns ``(total loss, {ce, <aux names>}, output margin (B,))``."""
        with self.adapter.capture(batch["last"]) as slots:
            self.adapter.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        residuals = self.adapter.stack(slots)
        logits = self.answer_logits(residuals[-1])
        rows = torch.arange(logits.shape[0], device=logits.device)
        ce = F.cross_entropy(logits, batch["correct"])
        margin = logits[rows, batch["correct"]] - logits[rows, batch["wrong"]]
        parts = {"ce": ce}
        total = ce
        view = BatchView(residuals, batch["correct"], batch["wrong"], self.adapter)
        for aux in self.aux_losses:
            value = aux(view)
            parts[aux.name] = value
            total = total + aux.weight * value  # even a zero loss stays in the graph (DDP sees every parameter)
        return total, parts, margin

    # -- Lightning hooks -------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """One validation accuracy per validation loader of the datamodule."""
        names = getattr(self.trainer.datamodule, "val_names", None) if self.trainer is not None else None
        if names and len(self.val_acc) != len(names):
            self.val_acc = torch.nn.ModuleList(BinaryAccuracy() for _ in names).to(self.device)
            self._val_names = list(names)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """CE + Σ λ·aux on one batch; logs ``train/loss``, ``train/ce``, ``train/<aux>``, ``train/acc``."""
        total, parts, margin = self.losses(batch)
        self.train_acc(margin > 0, torch.ones_like(margin, dtype=torch.long))
        size = margin.shape[0]
        self.log("train/loss", total, prog_bar=True, batch_size=size)
        for name, value in parts.items():
            self.log(f"train/{name}", value, batch_size=size)
        self.log("train/acc", self.train_acc, prog_bar=True, on_step=True, on_epoch=True, batch_size=size)
        return total

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Held-out CE, auxiliary losses and accuracy (correct token beats the wrong one), per validation set."""
        total, parts, margin = self.losses(batch)
        names = getattr(self, "_val_names", [str(i) for i in range(dataloader_idx + 1)])
        name = names[dataloader_idx]
        if len(self.val_acc) <= dataloader_idx:
            self.val_acc.append(BinaryAccuracy().to(self.device))
        metric = self.val_acc[dataloader_idx]
        metric(margin > 0, torch.ones_like(margin, dtype=torch.long))
        size = margin.shape[0]
        opts = {"batch_size": size, "add_dataloader_idx": False}
        self.log(f"val/loss/{name}", total, **opts)
        for part, value in parts.items():
            self.log(f"val/{part}/{name}", value, **opts)
        self.log(f"val/acc/{name}", metric, on_epoch=True, prog_bar=True, **opts)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the trainable (LoRA) parameters only."""
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    # -- checkpoints and export ------------------------------------------------------------------------

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Only the trainable (adapter) weights: the frozen base model is never written to a checkpoint."""
        full = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        trainable = {prefix + name for name, p in self.named_parameters() if p.requires_grad}
        return type(full)((key, value) for key, value in full.items() if key in trainable)

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> _IncompatibleKeys:
        """Load a checkpoint written by :meth:`state_dict`: the adapter weights, never the frozen base.

        The checkpoint's keys must be exactly this module's trainable (adapter) weights, with the same shapes;
        frozen base weights may be absent (they always are) or present (then they are loaded). Anything else — an
        adapter trained on other layers, with another rank or other target modules — raises
        :class:`CheckpointMismatchError` (a ``ValueError``) with the counts of missing and unexpected adapter
        weights, a few example names and the ranks when shapes differ. ``strict`` is accepted for the torch and
        Lightning signature; this rule applies whatever its value (``strict_loading = False`` only stops Lightning
        from demanding the base weights). Returns the keys torch reports, without the frozen base weights.
        """
        full = super().state_dict(keep_vars=True)
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        given = set(state_dict)
        missing = sorted(trainable - given)
        unexpected = sorted(given - set(full))
        shapes = [
            (key, tuple(state_dict[key].shape), tuple(full[key].shape))
            for key in sorted(given & set(full))
            if isinstance(state_dict[key], Tensor) and tuple(state_dict[key].shape) != tuple(full[key].shape)
        ]
        if missing or unexpected or shapes:
            raise CheckpointMismatchError(_mismatch_message(missing, unexpected, shapes, self.hparams))
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        frozen = set(full) - trainable
        return _IncompatibleKeys([k for k in result.missing_keys if k not in frozen], list(result.unexpected_keys))

    def adapter_dir(self) -> Path:
        """Where the final adapter is exported: ``<log dir>/adapter``."""
        root = self.trainer.log_dir or self.trainer.default_root_dir
        return Path(root) / "adapter"

    def on_train_end(self) -> None:
        """Export the adapter with PEFT's ``save_pretrained`` (rank zero only)."""
        self.save_adapter(self.adapter_dir())

    @rank_zero_only
    def save_adapter(self, path: str | Path) -> None:
        """Write the LoRA adapter so that ``PeftModel.from_pretrained(base, path)`` loads it."""
        self.model.save_pretrained(str(path))
