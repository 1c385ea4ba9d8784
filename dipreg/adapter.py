"""Handles on a causal LM's decoder layers, final norm and unembedding, found through :mod:`dipreg.architectures`.

Everything else (lenses, patchscope, hinge loss, degradations) asks a :class:`ModelAdapter`. The adapter
captures residual streams with forward hooks on the decoder layers, because ``output_hidden_states``
differs by architecture about whether its last entry is already normed.

Precision and placement: the final norm runs as the model runs it (in the model's dtype), then the normed residual
and the two unembedding rows are upcast, so every margin, DiD and hinge is computed in float32 whatever the model's
dtype. Inputs go to the embedding's execution device, margins are read on the unembedding's; blocks in between may
sit anywhere (accelerate device maps, CPU or disk offload: see :mod:`dipreg.devices`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from dipreg.architectures import Architecture, UnsupportedModelError, architecture
from dipreg.devices import execution_device, onloaded

if TYPE_CHECKING:
    from dipreg.kv_prefix import PrefixCache


def unwrap_causal_lm(model: nn.Module) -> PreTrainedModel:
    """Return the HF ``*ForCausalLM`` inside ``model`` (a PEFT ``PeftModel`` or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and not isinstance(model, PreTrainedModel):
        model = get_base()
    if not isinstance(model, PreTrainedModel):
        raise UnsupportedModelError(
            f"Expected a transformers PreTrainedModel (or a PEFT model wrapping one), got {type(model).__name__}."
        )
    return model


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode for the body of a ``with`` block; its previous mode comes back on exit (also on an
    exception). Every measurement in dipreg runs inside one, so a training loop around it keeps its mode."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def output_tensor(output: Tensor | tuple) -> Tensor:
    """The hidden states of a decoder layer's output, whether it returned a tensor or a tuple."""
    # Since transformers 4.56 some decoder layers return a plain tensor, others a tuple.
    return output if isinstance(output, Tensor) else output[0]


@dataclass
class ModelAdapter:
    """Architecture-agnostic handles on a causal LM.

    Args:
        model: an HF causal LM, PEFT-wrapped or not.

    Example:
        >>> adapter = ModelAdapter(model)  # doctest: +SKIP
        >>> adapter.num_layers, adapter.final_norm, adapter.lm_head  # doctest: +SKIP
    """

    model: nn.Module

    def __post_init__(self) -> None:
        self.causal_lm = unwrap_causal_lm(self.model)
        model_type = getattr(self.causal_lm.config, "model_type", None)
        arch = architecture(model_type, type(self.causal_lm).__name__)
        self.model_type: str = model_type
        self.architecture: Architecture = arch
        self.backbone: nn.Module = getattr(self.causal_lm, arch.backbone)
        self.layers: nn.ModuleList = getattr(self.backbone, arch.layers)
        self.final_norm: nn.Module = getattr(self.backbone, arch.final_norm)
        head = self.causal_lm.get_output_embeddings()
        if head is None:
            raise UnsupportedModelError(f"{type(self.causal_lm).__name__} has no output embedding (lm_head).")
        self.lm_head: nn.Linear = head
        cap = getattr(self.causal_lm.config, arch.softcap_key, None) if arch.softcap_key else None
        self.softcap: float | None = float(cap) if cap else None

    @property
    def num_layers(self) -> int:
        """``L``, the number of decoder blocks."""
        return len(self.layers)

    @property
    def device(self) -> torch.device:
        """The device the unembedding runs on (where margins are read); under accelerate its execution device."""
        return execution_device(self.lm_head)

    @property
    def input_device(self) -> torch.device:
        """The device token ids go to: the input embedding's execution device (not ``model.device``, which under
        an accelerate device map is the first parameter's device, possibly ``meta``)."""
        return execution_device(self.causal_lm.get_input_embeddings())

    def eval_mode(self) -> contextlib.AbstractContextManager[nn.Module]:
        """:func:`eval_mode` of the whole model (PEFT wrapper included)."""
        return eval_mode(self.model)

    def apply_softcap(self, logits: Tensor) -> Tensor:
        """The model's final-logit softcap ``c·tanh(logits/c)`` (Gemma 2), or ``logits`` unchanged when it has none.
        ``*ForCausalLM.forward`` applies it after ``lm_head``; every logit dipreg reads goes through here."""
        if self.softcap is None:
            return logits
        return torch.tanh(logits / self.softcap) * self.softcap

    def vocab_logits(self, normed: Tensor) -> Tensor:
        """Full-vocabulary float32 logits of residuals already through the final norm: ``lm_head`` (bias included,
        in the model's dtype, as the model computes its output), then upcast and the softcap. Use
        :meth:`unembed_rows` when only a few tokens are needed."""
        return self.apply_softcap(self.lm_head(normed).float())

    def relative_depths(self) -> Tensor:
        """``ℓ/L`` for ``ℓ = 1..L`` (float32, on CPU)."""
        return torch.arange(1, self.num_layers + 1, dtype=torch.float32) / self.num_layers

    def unembed_rows(self, normed: Tensor, token_ids: Tensor) -> Tensor:
        """Logits of selected vocabulary rows only, never the full vocabulary.

        Args:
            normed: ``(..., N, D)`` residuals already passed through the final norm.
            token_ids: ``(N,)`` one token id per item.

        Returns:
            ``(..., N)`` float32 logits, with the head's bias and the final-logit softcap where the model has them.
            The rows and ``normed`` are upcast to float32 before the product (a bfloat16 dot product over a few
            thousand dimensions would lose two to three significant digits); the result is on :attr:`device`.
        """
        rows, bias = self._head_rows(token_ids)
        logits = (normed.to(rows.device, torch.float32) * rows).sum(-1)
        if bias is not None:
            logits = logits + bias
        return self.apply_softcap(logits)

    def _head_rows(self, token_ids: Tensor) -> tuple[Tensor, Tensor | None]:
        """``lm_head`` rows (and bias entries) of ``token_ids`` in float32 on :attr:`device`, read through
        accelerate's offload hook when the head's weights are offloaded (its parameters are then ``meta``)."""
        device = self.device
        with onloaded(self.lm_head):
            weight = self.lm_head.weight
            ids = token_ids.to(weight.device)
            rows = weight[ids].to(device, torch.float32)
            bias = getattr(self.lm_head, "bias", None)
            picked = bias[ids].to(device, torch.float32) if bias is not None else None
        return rows, picked

    def margin(self, residual: Tensor, pos_ids: Tensor, neg_ids: Tensor) -> Tensor:
        """Logit-lens margin ``U[t_pos]·N(h) − U[t_neg]·N(h)`` for raw residuals ``(..., N, D)``, in float32.

        The final norm sees the residual in the norm's own dtype (as the model's forward does); everything after
        it is float32 (:meth:`unembed_rows`)."""
        normed = self.final_norm(residual.to(self.norm_dtype))
        return self.unembed_rows(normed, pos_ids) - self.unembed_rows(normed, neg_ids)

    @property
    def norm_dtype(self) -> torch.dtype:
        """The dtype the final norm computes in (its weight's dtype; the model's dtype for a norm without one)."""
        weight = getattr(self.final_norm, "weight", None)
        if isinstance(weight, Tensor) and weight.is_floating_point():
            return weight.dtype
        return next((p.dtype for p in self.causal_lm.parameters() if p.is_floating_point()), torch.float32)

    @contextlib.contextmanager
    def capture(self, positions: Tensor) -> Iterator[list[Tensor | None]]:
        """Hook every decoder layer for one forward pass and keep its output at ``positions`` only.

        Args:
            positions: ``(B,)`` the sequence index to keep for each batch row, or ``(B, K)`` several per row.

        Yields:
            A list with one slot per layer, filled with ``(B, D)`` (or ``(B, K, D)``) tensors during the forward.
            Only the first firing of each layer is kept (gradient-checkpoint recomputation fires hooks again), and
            the hooks are removed on exit. Gradients flow through the captured tensors.
        """
        slots: list[Tensor | None] = [None] * self.num_layers
        rows = torch.arange(positions.shape[0], device=positions.device).view(-1, *([1] * (positions.dim() - 1)))

        def make_hook(index: int):
            def hook(_module: nn.Module, _inputs: tuple, output: Tensor | tuple) -> None:
                if slots[index] is None:
                    hidden = output_tensor(output)
                    slots[index] = hidden[rows.to(hidden.device), positions.to(hidden.device)]

            return hook

        handles = [layer.register_forward_hook(make_hook(i)) for i, layer in enumerate(self.layers)]
        try:
            yield slots
        finally:
            for handle in handles:
                handle.remove()

    def run_backbone(self, input_ids: Tensor, attention_mask: Tensor, prefix: PrefixCache | None = None) -> None:
        """One backbone forward (no LM head) of right-padded ``input_ids``, continuing ``prefix`` when given."""
        if prefix is None:
            self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        else:
            self.backbone(
                input_ids=input_ids,
                attention_mask=prefix.attention_mask(attention_mask),
                past_key_values=prefix.expanded(input_ids.shape[0]),
                use_cache=True,
            )

    def residuals(
        self, input_ids: Tensor, attention_mask: Tensor, positions: Tensor, prefix: PrefixCache | None = None
    ) -> Tensor:
        """Run the backbone once (no LM head) and return the residual stream after every block.

        Args:
            input_ids: ``(B, T)`` token ids (right-padded).
            attention_mask: ``(B, T)`` mask of ``input_ids``.
            positions: ``(B,)`` or ``(B, K)`` indices into ``input_ids`` to keep.
            prefix: a cached prefix every row continues (``input_ids`` then hold only what follows it).

        Returns:
            ``(L, B, D)`` (or ``(L, B, K, D)`` for ``(B, K)`` positions): the output of block ``ℓ`` at
            ``positions`` for each row.
        """
        with self.capture(positions) as slots:
            self.run_backbone(input_ids, attention_mask, prefix)
        return self.stack(slots)

    def stack(self, slots: list[Tensor | None]) -> Tensor:
        """Stack the slots filled by :meth:`capture` into ``(L, ...)`` on :attr:`device` (blocks placed on other
        devices are moved there; gradients flow). Raises when a layer did not run."""
        missing = [i for i, s in enumerate(slots) if s is None]
        if missing:
            raise RuntimeError(f"Decoder layers {missing} did not run during the forward pass.")
        device = self.device
        return torch.stack([s.to(device) for s in slots])  # type: ignore[union-attr]
