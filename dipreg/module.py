"""`DipRegModule`: LoRA SFT of a causal LM on the answer token, plus pluggable auxiliary losses (paper §6).

One training forward runs the backbone with :meth:`ModelAdapter.capture` at the answer positions; the CE is
computed from the captured last-layer residual (final norm + head, at the answer position only, never B×T×V),
and every auxiliary loss reads the same captured residuals. Checkpoints hold only the trainable adapter weights.
This module trains; measuring held-out trajectories lives in :mod:`dipreg.heldout`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_only
from peft import LoraConfig, PeftModel, get_peft_model
from torch import Tensor
from torchmetrics.classification import BinaryAccuracy

from dipreg.adapter import ModelAdapter
from dipreg.losses import AuxLoss, BatchView
from dipreg.models import load_model

__all__ = ["LORA_TARGETS", "DipRegModule", "late_layers"]

#: LoRA target modules per model type: attention and MLP projections.
LORA_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


def late_layers(num_layers: int, layers: str | float) -> list[int] | None:
    """Layer indices to adapt: ``None`` for ``"all"``, else the last ``ceil(fraction · L)`` layers."""
    if layers == "all":
        return None
    try:
        fraction = float(layers)
    except (TypeError, ValueError) as err:
        raise ValueError(f"layers must be 'all' or a fraction in (0, 1] of the last layers, got {layers!r}.") from err
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"layers={layers!r}: a late fraction must lie in (0, 1] (e.g. 0.25 for the last quarter).")
    count = max(1, math.ceil(fraction * num_layers - 1e-9))
    return list(range(num_layers - count, num_layers))


class DipRegModule(LightningModule):
    """LoRA fine-tuning on the answer token with auxiliary losses read from the same forward pass.

    Args:
        model_name: HF name or local path; ``None`` is the embedded default (SmolLM2-135M-Instruct).
        r, alpha, dropout: LoRA rank, scaling and dropout.
        target_modules: modules to adapt; ``None`` picks :data:`LORA_TARGETS` for the architecture.
        layers: ``"all"`` or a late fraction (``0.25``: LoRA on the last 25 % of layers only).
        aux_losses: auxiliary losses (:class:`~dipreg.losses.AuxLoss`), e.g. ``[WrongMarginHinge(weight=0.2)]``.
        lr, weight_decay: AdamW settings.
        gradient_checkpointing: recompute activations in backward (non-reentrant, LoRA-safe).
        model, tokenizer: an already loaded model (used instead of ``model_name``) and its tokenizer.

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
        model: Any = None,
        tokenizer: Any = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["aux_losses", "model", "tokenizer"])
        if r < 1:
            raise ValueError(f"DipRegModule: LoRA rank r must be >= 1, got {r}.")
        self.aux_losses: list[AuxLoss] = list(aux_losses or [])
        for loss in self.aux_losses:
            if not isinstance(loss, AuxLoss):
                raise TypeError(
                    f"aux_losses: {loss!r} is not a dipreg.losses.AuxLoss; subclass it (see dipreg.losses)."
                )
        names = [loss.name for loss in self.aux_losses]
        if len(set(names)) != len(names):
            raise ValueError(f"aux_losses: names must be unique (they name the logged metrics), got {names}.")
        if model is None:
            model, loaded_tok = load_model(model_name)
            tokenizer = tokenizer or loaded_tok
        self.tokenizer = tokenizer
        model.config.use_cache = False
        base = ModelAdapter(model)
        to_adapt = late_layers(base.num_layers, layers)
        targets = target_modules or LORA_TARGETS.get(base.model_type)
        layers_path = next(name for name, mod in model.named_modules() if mod is base.layers)
        config = LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=targets,
            layers_to_transform=to_adapt,
            layers_pattern=layers_path.rsplit(".", 1)[-1] if to_adapt is not None else None,
            fan_in_fan_out=base.model_type == "gpt2",
            bias="none",
        )
        self.model: PeftModel = get_peft_model(model, config)
        self.model.train()  # load_model returns eval mode; LoRA dropout must be live while training
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.adapter = ModelAdapter(self.model)
        self.train_acc = BinaryAccuracy()
        self.val_acc = torch.nn.ModuleList()

    # -- forward ---------------------------------------------------------------------------------------

    def answer_logits(self, residual: Tensor) -> Tensor:
        """Full-vocabulary logits ``(B, V)`` of last-layer residuals ``(B, D)`` at the answer positions."""
        return self.adapter.vocab_logits(self.adapter.final_norm(residual))

    def losses(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """One backbone forward; returns ``(total loss, {ce, <aux names>}, output margin (B,))``."""
        with self.adapter.capture(batch["last"]) as slots:
            self.adapter.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        residuals = torch.stack(slots)  # type: ignore[arg-type]
        logits = self.answer_logits(residuals[-1]).float()
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
