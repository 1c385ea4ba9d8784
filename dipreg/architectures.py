"""The one table of architecture facts: where each model type keeps its layers, final norm, LoRA targets and MLP.

Everything that needs a fact about an architecture reads it here: :class:`~dipreg.adapter.ModelAdapter` (backbone,
layers, final norm, softcap), :class:`~dipreg.training.module.DipRegModule` (LoRA targets, ``fan_in_fan_out``), the
degradation operators (:mod:`dipreg.eval.degradation.layouts`: the MLP matrices) and :mod:`dipreg.memory` (LoRA
targets). Adding an architecture is one :class:`Architecture` entry in :data:`ARCHITECTURES`. This module holds
data only; it imports nothing heavier than the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ARCHITECTURES",
    "SUPPORTED_MODEL_TYPES",
    "Architecture",
    "MlpLayout",
    "UnsupportedModelError",
    "architecture",
]


class UnsupportedModelError(TypeError):
    """The model's architecture is not in :data:`ARCHITECTURES`."""


@dataclass(frozen=True)
class MlpLayout:
    """Where a decoder block keeps its MLP matrices.

    Args:
        attr: the MLP's attribute on a decoder block (``"mlp"``).
        inputs: the input projections (hidden -> intermediate), attribute names on the MLP.
        output: the output projection (intermediate -> hidden).

    Example:
        >>> MlpLayout("mlp", ("gate_proj", "up_proj"), "down_proj").output
        'down_proj'
    """

    attr: str
    inputs: tuple[str, ...]
    output: str


@dataclass(frozen=True)
class Architecture:
    """The facts dipreg needs about one model type.

    Args:
        backbone: the backbone's attribute on the ``*ForCausalLM`` (``"model"``, ``"transformer"``).
        layers: the decoder blocks' ``ModuleList`` attribute on the backbone.
        final_norm: the final norm's attribute on the backbone.
        lora_targets: the modules LoRA adapts by default (attention and MLP projections).
        mlp: the MLP layout the weight operators act on; ``None`` where the blocks hold no ``nn.Linear`` MLP
            (GPT-2's Conv1D), which those operators then refuse.
        fan_in_fan_out: the projections store their weight as ``(in, out)`` (GPT-2's Conv1D); PEFT must know.
        softcap_key: the config attribute holding the final-logit softcap the ``*ForCausalLM`` applies after
            ``lm_head`` (Gemma 2's ``final_logit_softcapping``); ``None`` when the architecture has none.

    Example:
        >>> ARCHITECTURES["llama"].final_norm
        'norm'
    """

    backbone: str
    layers: str
    final_norm: str
    lora_targets: tuple[str, ...]
    mlp: MlpLayout | None
    fan_in_fan_out: bool = False
    softcap_key: str | None = None


_GATED_MLP = MlpLayout("mlp", ("gate_proj", "up_proj"), "down_proj")
_LLAMA_LORA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LLAMA = Architecture("model", "layers", "norm", _LLAMA_LORA, _GATED_MLP)

#: model_type (``config.model_type``) -> its facts. Register a new architecture by adding one entry.
ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma2": Architecture("model", "layers", "norm", _LLAMA_LORA, _GATED_MLP, softcap_key="final_logit_softcapping"),
    "gpt2": Architecture("transformer", "h", "ln_f", ("c_attn", "c_proj", "c_fc"), None, fan_in_fan_out=True),
    "gpt_neox": Architecture(
        "gpt_neox",
        "layers",
        "final_layer_norm",
        ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
        MlpLayout("mlp", ("dense_h_to_4h",), "dense_4h_to_h"),
    ),
}

#: The model types dipreg ships support for (the self-check builds a tiny model of each).
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(ARCHITECTURES)


def architecture(model_type: object, model_name: str | None = None) -> Architecture:
    """The :class:`Architecture` of ``model_type``.

    Args:
        model_type: a config's ``model_type``.
        model_name: the model's class name, for the error message.

    Raises:
        UnsupportedModelError: the type is not in :data:`ARCHITECTURES`; the message lists the ones that are.
    """
    found = ARCHITECTURES.get(model_type) if isinstance(model_type, str) else None
    if found is None:
        what = f"{model_name} " if model_name else ""
        raise UnsupportedModelError(
            f"dipreg does not know the architecture {what}(model_type={model_type!r}). Supported model types: "
            f"{', '.join(ARCHITECTURES)}. A new one is one entry in dipreg.architectures.ARCHITECTURES."
        )
    return found
