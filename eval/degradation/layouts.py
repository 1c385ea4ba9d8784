"""Finds the weights the degradation operators touch (MLP matrices, block Linears), from the architecture table.

This module only finds modules; it never changes them. PEFT-wrapped projections are resolved to their base
layer, and LoRA adapter matrices are never returned (they are not part of the intact model's weights).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from dipreg.adapter import ModelAdapter
from dipreg.architectures import ARCHITECTURES


class UnsupportedOperatorError(ValueError):
    """A degradation operator cannot act on this architecture."""


def base_layer(module: nn.Module) -> nn.Module:
    """The wrapped base layer of a PEFT tuner layer, or ``module`` itself."""
    get_base = getattr(module, "get_base_layer", None)
    return get_base() if callable(get_base) else module


def is_peft_wrapped(module: nn.Module) -> bool:
    """True when ``module`` is a PEFT tuner layer (it has a ``base_layer``)."""
    return hasattr(module, "base_layer")


@dataclass(frozen=True)
class MlpModules:
    """The MLP of one decoder block: ``inputs`` map hidden -> intermediate, ``output`` maps back.

    ``module`` owns the projections (attribute names ``input_names`` / ``output_name``); the projections may be
    PEFT tuner layers, see :func:`base_layer`.
    """

    module: nn.Module
    input_names: tuple[str, ...]
    output_name: str

    @property
    def inputs(self) -> list[nn.Module]:
        """The input projections as stored (possibly PEFT-wrapped)."""
        return [getattr(self.module, name) for name in self.input_names]

    @property
    def output(self) -> nn.Module:
        """The output projection as stored (possibly PEFT-wrapped)."""
        return getattr(self.module, self.output_name)

    def base_linears(self) -> list[nn.Linear]:
        """Every MLP matrix as a plain ``nn.Linear`` (PEFT base layers resolved)."""
        return [base_layer(m) for m in [*self.inputs, self.output]]  # type: ignore[misc]


def _with_mlp_layout() -> list[str]:
    """The model types whose MLP layout :data:`~dipreg.architectures.ARCHITECTURES` knows (their blocks use
    ``nn.Linear``)."""
    return [name for name, arch in ARCHITECTURES.items() if arch.mlp is not None]


def mlp_modules(adapter: ModelAdapter, index: int, operator: str) -> MlpModules:
    """The MLP of decoder block ``index`` (0-based); a clear error naming ``operator`` where unsupported."""
    layout = adapter.architecture.mlp
    if layout is None:
        raise UnsupportedOperatorError(
            f"Operator {operator!r} acts on the MLP matrices, which dipreg.eval does not know for the "
            f"{adapter.model_type!r} architecture ({type(adapter.causal_lm).__name__}; GPT-2 keeps them in Conv1D "
            f"c_fc/c_proj). Supported for {operator!r}: {', '.join(_with_mlp_layout())}. Use a structural operator "
            "that does not touch weights (late_drop, mid_drop, deprive) on this model."
        )
    mlp_attr, inputs, output = layout.attr, layout.inputs, layout.output
    mlp = getattr(adapter.layers[index], mlp_attr)
    for name in (*inputs, output):
        if not isinstance(base_layer(getattr(mlp, name)), nn.Linear):
            raise UnsupportedOperatorError(
                f"Operator {operator!r}: block {index} {mlp_attr}.{name} is {type(getattr(mlp, name)).__name__}, "
                "not an nn.Linear; this model's MLP layout is not supported."
            )
    return MlpModules(mlp, inputs, output)


def block_linears(adapter: ModelAdapter, operator: str) -> list[tuple[str, nn.Linear]]:
    """Every ``nn.Linear`` inside the decoder blocks (attention and MLP; not embeddings, not the LM head).

    PEFT base layers are included; LoRA adapter matrices (``lora_*``) are not. Raises when the blocks hold
    no ``nn.Linear`` (GPT-2's Conv1D).
    """
    found = [
        (f"layers.{i}.{name}", module)
        for i, layer in enumerate(adapter.layers)
        for name, module in layer.named_modules()
        if isinstance(module, nn.Linear) and not any(part.startswith("lora_") for part in name.split("."))
    ]
    if not found:
        raise UnsupportedOperatorError(
            f"Operator {operator!r} quantizes nn.Linear weights, but the decoder blocks of the {adapter.model_type!r} "
            f"architecture hold none (GPT-2 uses Conv1D). Supported: models whose blocks use nn.Linear "
            f"({', '.join(_with_mlp_layout())})."
        )
    return found
