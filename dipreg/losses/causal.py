"""`CausalMarginHinge`: the dip regulariser read through the causal (patchscope) lens, with gradients.

For a few window layers per step (sampled, seeded), each training row's residual ``h_ℓ`` is transplanted into the
last position of the neutral context exactly as :class:`~dipreg.lenses.causal.CausalLens` does (same hooks, same
band-skipping of the blocks before the patch, same neutral-prompt key/value cache); blocks ``ℓ+1..L`` then run
**with gradients** (the LoRA adapter active) and the output margin read there enters ``relu(δ − margin)``.
The logit-lens hinge can lower its loss by reshaping what the logit lens reads; this one only by changing what the
model's own later blocks make of ``h_ℓ``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from transformers import AutoTokenizer

from dipreg.adapter import ModelAdapter
from dipreg.kv_prefix import PrefixCache
from dipreg.lenses.causal import DEFAULT_NEUTRAL_PROMPT, neutral_token_ids

# The causal lens's own hooks: the hinge transplants with exactly the code the lens measures with.
from dipreg.lenses.causal import _patch_blocks as patch_blocks
from dipreg.lenses.causal import _skip_blocks as skip_blocks
from dipreg.losses.base import HINGE_WINDOW, BatchView
from dipreg.losses.logit import WrongMarginHinge
from dipreg.validation import validate_count

__all__ = ["CausalMarginHinge"]


@functools.lru_cache(maxsize=4)
def _saved_tokenizer(path: str) -> Any:
    """The tokenizer saved with a model (local files only, never the network), loaded once."""
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


@contextlib.contextmanager
def _without_checkpointing(adapter: ModelAdapter) -> Iterator[None]:
    """Gradient checkpointing off for the body: under it transformers drops the key/value cache of a training
    forward, and the transplant forward must attend to the neutral prefix (it is one token: nothing to save)."""
    saved = [(layer, layer.__dict__.get("gradient_checkpointing")) for layer in adapter.layers]
    try:
        for layer, _ in saved:
            layer.gradient_checkpointing = False
        yield
    finally:
        for layer, value in saved:
            if value is None:
                layer.__dict__.pop("gradient_checkpointing", None)
            else:
                layer.gradient_checkpointing = value


class CausalMarginHinge(WrongMarginHinge):
    """``relu(δ − causal margin_ℓ)`` for ``layers_per_step`` window layers sampled each step, averaged over them and
    the batch rows.

    The causal margin of row ``i`` at block ``ℓ``: the neutral context's last position gets ``h_ℓ`` (the row's
    output of block ℓ at its answer position, from the training forward) as the output of block ℓ; blocks
    ``ℓ+1..L`` run in the module's current mode (LoRA active, dropout as in training) and the margin
    ``correct − wrong`` is read after the final norm. At ``ℓ = L`` that is the logit-lens margin, so with the window
    ``(1, 1)`` this loss equals :class:`~dipreg.losses.WrongMarginHinge`'s.

    Gradients (one sampled ``ℓ``): the neutral prefix's key/value cache is recomputed from the current weights on
    every call without gradients, and blocks ``1..ℓ`` of the transplant forward are skipped (their output is
    overwritten), so the transplant path sends gradient only into the LoRA weights of blocks ``ℓ+1..L``. The
    transplanted ``h_ℓ`` keeps its graph (unless ``detach_residual``): the LoRA weights of blocks ``1..ℓ`` receive
    exactly ``(∂loss/∂h_ℓ)·(∂h_ℓ/∂θ)`` through the training forward, and nothing else. The frozen base gets none.

    Layer sampling: ``layers_per_step`` distinct window layers per call (all of them when the window holds fewer),
    drawn from a private generator seeded with ``seed`` (``None``: ``torch.initial_seed()`` at the first call, which
    ``seed_everything`` sets), so the global random stream (dropout, data order) is the same as without the hinge.
    The mean over sampled layers is an unbiased estimate of the mean over the whole window.

    Args:
        window: relative-depth window ``(lo, hi)``.
        delta: the margin ``δ`` a layer must reach to cost nothing.
        weight: ``λ`` (>= 0).
        layers_per_step: window layers transplanted per training step (>= 1).
        seed: seed of the layer sampling (``None``: the run's torch seed).
        neutral_prompt: the neutral decoding context (default: the causal lens's).
        min_band_rows: sampled layers share one forward (starting after the first of them, as in the causal lens)
            until it holds this many rows; ``1``: one forward per sampled layer.
        detach_residual: stop the gradient at ``h_ℓ`` (train only blocks after ℓ through this loss).
        tokenizer: tokenizes the neutral prompt; ``None``: the tokenizer saved with the model
            (``AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)``).

    Example:
        >>> hinge = CausalMarginHinge(window=(0.30, 0.85), weight=0.2, layers_per_step=2)
        >>> hinge.name
        'causal_hinge'
    """

    name = "causal_hinge"

    def __init__(
        self,
        window: tuple[float, float] = HINGE_WINDOW,
        delta: float = 0.0,
        weight: float = 0.2,
        layers_per_step: int = 2,
        seed: int | None = None,
        neutral_prompt: str = DEFAULT_NEUTRAL_PROMPT,
        min_band_rows: int = 64,
        detach_residual: bool = False,
        tokenizer: Any = None,
    ) -> None:
        super().__init__(window=window, delta=delta, weight=weight)
        self.layers_per_step = validate_count(layers_per_step, "CausalMarginHinge layers_per_step", 1)
        self.min_band_rows = validate_count(min_band_rows, "CausalMarginHinge min_band_rows", 1)
        if seed is not None:
            validate_count(seed, "CausalMarginHinge seed", 0)
        self.seed = seed
        self.neutral_prompt = neutral_prompt
        self.detach_residual = bool(detach_residual)
        self.tokenizer = tokenizer
        self._generator: torch.Generator | None = None
        self._neutral_ids: list[int] | None = None
        self._tuple_output: dict[int, bool] = {}

    def __repr__(self) -> str:
        return (
            f"CausalMarginHinge(window={self.window}, delta={self.delta}, weight={self.weight}, "
            f"layers_per_step={self.layers_per_step}, seed={self.seed})"
        )

    # -- layer sampling ---------------------------------------------------------------------------------

    def sample_layers(self, layers: list[int]) -> list[int]:
        """``layers_per_step`` distinct entries of ``layers`` (sorted), from the hinge's own generator."""
        if self._generator is None:
            seed = torch.initial_seed() if self.seed is None else self.seed
            self._generator = torch.Generator().manual_seed(int(seed) % 2**63)
        if len(layers) <= self.layers_per_step:
            return list(layers)
        picks = torch.randperm(len(layers), generator=self._generator)[: self.layers_per_step]
        return sorted(layers[int(i)] for i in picks)

    # -- the transplant ---------------------------------------------------------------------------------

    def neutral_ids(self, adapter: ModelAdapter) -> list[int]:
        """Token ids of the neutral prompt (tokenized once)."""
        if self._neutral_ids is None:
            tokenizer = self.tokenizer or _saved_tokenizer(str(adapter.causal_lm.name_or_path))
            self._neutral_ids = neutral_token_ids(tokenizer, self.neutral_prompt)
        return self._neutral_ids

    def _blocks_return_tuples(self, adapter: ModelAdapter, prefix: PrefixCache, last: Tensor) -> bool:
        # Decoder blocks return a tensor or a tuple depending on the architecture (as in CausalLens); asked once.
        key = id(adapter.causal_lm)
        if key not in self._tuple_output:
            seen: list[bool] = []
            handle = adapter.layers[0].register_forward_hook(lambda _m, _i, out: seen.append(isinstance(out, tuple)))
            try:
                with torch.no_grad(), adapter.eval_mode():
                    adapter.backbone(input_ids=last, past_key_values=prefix.expanded(1), use_cache=True)
            finally:
                handle.remove()
            self._tuple_output[key] = seen[0]
        return self._tuple_output[key]

    def transplant_margins(
        self, adapter: ModelAdapter, residuals: Tensor, layers: list[int], correct: Tensor, wrong: Tensor
    ) -> Tensor:
        """``(len(layers), B)`` output margins of the neutral context with ``residuals[k]`` (``(k, B, D)``, the
        outputs of blocks ``layers[k]``, 0-based and ascending) transplanted at those blocks, with gradients."""
        ids = self.neutral_ids(adapter)
        prefix = PrefixCache(adapter, ids[:-1])  # the current weights' cache, without gradients (see the class doc)
        last = torch.tensor([ids[-1:]], device=adapter.device)
        tuple_output = self._blocks_return_tuples(adapter, prefix, last)
        num, batch, _ = residuals.shape
        out: list[Tensor] = []
        for group in self._bands(layers, batch):
            patch = torch.cat([residuals[k] for k in group])  # rows: layer-major, like CausalLens
            source = torch.tensor([layers[k] for k in group], device=patch.device).repeat_interleave(batch)
            rows = patch.shape[0]
            with (
                _without_checkpointing(adapter),
                skip_blocks(adapter, layers[group[0]] + 1, tuple_output),
                patch_blocks(adapter, source, patch) as final,
            ):
                adapter.backbone(input_ids=last.expand(rows, 1), past_key_values=prefix.expanded(rows), use_cache=True)
            out.append(adapter.margin(final[0], correct.repeat(len(group)), wrong.repeat(len(group))).float())
        return torch.cat(out).reshape(num, batch)

    def _bands(self, layers: list[int], batch: int) -> list[list[int]]:
        """Positions in ``layers`` grouped into forwards: a group grows until it holds ``min_band_rows`` rows."""
        groups: list[list[int]] = []
        for k in range(len(layers)):
            if groups and len(groups[-1]) * batch < self.min_band_rows:
                groups[-1].append(k)
            else:
                groups.append([k])
        return groups

    def window_margins(self, view: BatchView, layers: list[int]) -> Tensor:
        """Causal margins at ``layers_per_step`` of the window's ``layers`` (sampled): ``(k, B)``."""
        chosen = self.sample_layers(layers)
        residuals = view.residuals[chosen]
        if self.detach_residual:
            residuals = residuals.detach()
        return self.transplant_margins(view.adapter, residuals, chosen, view.correct_ids, view.wrong_ids)
