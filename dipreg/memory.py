"""Memory a model size needs in dipreg: parameters, residual capture, causal-lens rows, LoRA optimizer state.

Numbers come from the model's config: parameter and LoRA-target shapes are read off the model built on the
``meta`` device (transformers allocates nothing there), the rest is arithmetic on the config. Published configs
of a few sizes ship in ``dipreg/configs/`` (:data:`CONFIGS`); ``python -m dipreg.memory`` prints the README table.
This module computes; it never loads weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from dipreg.architectures import architecture
from dipreg.models import resolve_dtype

#: Shipped published configs (config.json only, no weights): name -> file in ``dipreg/configs``.
CONFIGS: dict[str, str] = {
    "Qwen2.5-1.5B": "qwen2.5-1.5b.json",
    "Qwen2.5-7B": "qwen2.5-7b.json",
    "Qwen2.5-32B": "qwen2.5-32b.json",
}
#: LoRA bytes per trainable parameter: float32 weight, float32 gradient, AdamW's two float32 moments.
LORA_BYTES_PER_PARAM = 16


def shipped_config(name: str) -> PretrainedConfig:
    """The config of a shipped size (:data:`CONFIGS`), as transformers builds it."""
    if name not in CONFIGS:
        raise ValueError(f"No shipped config {name!r}; choose from {', '.join(CONFIGS)}.")
    text = resources.files("dipreg").joinpath("configs", CONFIGS[name]).read_text(encoding="utf-8")
    data = json.loads(text)
    return AutoConfig.for_model(**data)


def meta_model(config: PretrainedConfig) -> nn.Module:
    """The causal LM of ``config`` on the ``meta`` device: every shape, no memory."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def parameter_count(model: nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def lora_parameter_count(model: nn.Module, r: int, targets: list[str]) -> int:
    """LoRA parameters of rank ``r`` on every module whose last name is in ``targets``: ``r·(in + out)`` each."""
    total = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets and hasattr(module, "weight") and module.weight.dim() == 2:
            total += r * sum(module.weight.shape)  # (out, in) for nn.Linear, (in, out) for GPT-2's Conv1D
    return total


@dataclass(frozen=True)
class MemoryRow:
    """One line of the table: what, how many bytes, and how it was counted."""

    name: str
    bytes: int
    detail: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready view."""
        return {"name": self.name, "bytes": self.bytes, "detail": self.detail}


def memory_table(
    config: PretrainedConfig,
    *,
    dtype: str = "bfloat16",
    batch_size: int = 16,
    lens_rows: int = 512,
    neutral_tokens: int = 13,
    lora_r: int = 16,
) -> list[MemoryRow]:
    """The memory rows of one model size.

    Args:
        config: the model's config (e.g. :func:`shipped_config`, or ``AutoConfig.from_pretrained(name)``).
        dtype: the weights' dtype (bytes per parameter and per captured activation).
        batch_size: contexts per audit forward (``--batch-size``).
        lens_rows: (item, layer) rows per causal-lens forward (``CausalLens.max_batch_rows``).
        neutral_tokens: tokens of the causal lens's neutral context (13 for the default prompt on SmolLM2).
        lora_r: LoRA rank.

    Rows: ``parameters`` (all weights), ``residual capture`` (what the hooks keep per audit batch: every block's
    output at each context's answer position, ``L·B·D``), ``causal-lens rows`` (one forward: the patched rows
    ``R·D`` plus the key/value cache they attend to, the shared neutral prefix expanded and concatenated per row:
    ``R·L·2·kv_heads·head_dim·neutral_tokens``), ``LoRA optimizer state`` (LoRA on the default targets of the
    architecture: weights, gradients and AdamW moments in float32, 16 bytes per parameter). Activations of the
    forward itself (attention, MLP) are not counted: they depend on the kernels.
    """
    size = torch.empty((), dtype=resolve_dtype(dtype)).element_size()
    model = meta_model(config)
    params = parameter_count(model)
    layers, width = config.num_hidden_layers, config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or width // heads
    lora = lora_parameter_count(model, lora_r, list(architecture(config.model_type).lora_targets))
    kv = lens_rows * layers * 2 * kv_heads * head_dim * neutral_tokens
    return [
        MemoryRow("parameters", params * size, f"{params:,} parameters × {size} B ({dtype})"),
        MemoryRow(
            "residual capture",
            layers * batch_size * width * size,
            f"{layers} layers × {batch_size} contexts × width {width} × {size} B, per audit batch",
        ),
        MemoryRow(
            "causal-lens rows",
            (lens_rows * width + kv) * size,
            f"{lens_rows} rows × (width {width} + {layers} layers × 2 × {kv_heads} kv heads × {head_dim} × "
            f"{neutral_tokens} tokens) × {size} B, per forward",
        ),
        MemoryRow(
            "LoRA optimizer state",
            lora * LORA_BYTES_PER_PARAM,
            f"{lora:,} LoRA parameters (r={lora_r}) × {LORA_BYTES_PER_PARAM} B (fp32 weight, grad, 2 AdamW moments)",
        ),
    ]


def _human(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def markdown_table(names: list[str] | None = None, **options: Any) -> str:
    """The README table: one column per shipped size (default: all of :data:`CONFIGS`), one row per item."""
    names = list(CONFIGS) if names is None else names
    tables = {name: memory_table(shipped_config(name), **options) for name in names}
    header = "| | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names) + "\n"
    rows = [
        f"| {row.name} | " + " | ".join(_human(tables[n][i].bytes) for n in names) + " |"
        for i, row in enumerate(next(iter(tables.values())))
    ]
    return header + "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
