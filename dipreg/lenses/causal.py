"""The causal (patchscope) lens: transplant a residual into a neutral decoding context and read the output margin.

For source layer ℓ, ``h_ℓ`` (the output of block ℓ at a context's answer position) overwrites the output of
block ℓ at the LAST position of a neutral context; blocks ℓ+1..L run and the output margin (final norm, two
unembedding rows, softcap) is read. The neutral prefix (every token but the last) is the same for every item:
its KV cache is computed once per lens object, then forwards of the single last token, batched over
(item, source layer) rows, do all the work. Blocks before a row's source layer would only compute what the
patch overwrites, so each forward serves a band of adjacent source layers and skips every block before the band
(their ``forward`` is bypassed for that call; the stored prefix cache already holds their keys and values).
This module measures; it never changes the model's weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from dipreg.adapter import ModelAdapter, output_tensor
from dipreg.kv_prefix import PrefixCache

#: Patchscopes' few-shot identity prompt; the patch goes into its final "?".
DEFAULT_NEUTRAL_PROMPT = "king king\n1135 1135\nhello hello\n?"


def neutral_token_ids(tokenizer: Any, neutral_prompt: str) -> list[int]:
    """Token ids of the neutral context (the tokenizer's usual special tokens included); at least two."""
    ids = tokenizer(neutral_prompt, add_special_tokens=True)["input_ids"]
    if len(ids) < 2:
        raise ValueError(
            f"The neutral prompt {neutral_prompt!r} is {len(ids)} token(s) long; the causal lens needs a prefix "
            f"and a last token to patch. Use a longer prompt (default: {DEFAULT_NEUTRAL_PROMPT!r})."
        )
    return ids


def _replace_output(output: Tensor | tuple, hidden: Tensor) -> Tensor | tuple:
    # Decoder layers return a tensor or a tuple depending on the architecture: keep the type.
    return hidden if isinstance(output, Tensor) else (hidden, *output[1:])


@contextlib.contextmanager
def _patch_blocks(adapter: ModelAdapter, source: Tensor, patch: Tensor) -> Iterator[list[Tensor]]:
    """Hook every block: rows whose ``source`` is block k get the last position of its output replaced by
    their ``patch`` row. Yields a list that receives the last block's (patched) output at the last position."""
    final: list[Tensor] = []
    last_index = adapter.num_layers - 1

    def make_hook(index: int):
        rows = source == index
        active = bool(rows.any())

        def hook(_module: nn.Module, _inputs: tuple, output: Tensor | tuple) -> Tensor | tuple:
            hidden = output_tensor(output)
            if active:  # the block may run on another device than the residuals were read on (device maps)
                here = hidden.device
                last = torch.where(rows.to(here)[:, None], patch.to(here, hidden.dtype), hidden[:, -1])
                hidden = torch.cat([hidden[:, :-1], last[:, None]], dim=1)
                output = _replace_output(output, hidden)
            if index == last_index:
                final.append(hidden[:, -1])
            return output

        return hook

    handles = [layer.register_forward_hook(make_hook(i)) for i, layer in enumerate(adapter.layers)]
    try:
        yield final
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _skip_blocks(adapter: ModelAdapter, count: int, tuple_output: bool) -> Iterator[None]:
    """Blocks ``0..count-1`` pass their input through unchanged for the duration (their hooks still fire).

    Only for rows whose source block is ``count - 1`` or later: the patch overwrites whatever these blocks give.
    A ``forward`` set on the instance (accelerate's offload hooks do that) is put back on exit.
    """

    def passthrough(hidden_states: Tensor, *_args: Any, **_kwargs: Any) -> Tensor | tuple[Tensor]:
        return (hidden_states,) if tuple_output else hidden_states

    blocks = list(adapter.layers)[:count]
    saved = [block.__dict__.get("forward") for block in blocks]
    try:
        for block in blocks:
            block.forward = passthrough
        yield
    finally:
        for block, forward in zip(blocks, saved, strict=True):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


class CausalLens:
    """Patchscope margins: ``h_ℓ`` transplanted into a neutral context at layer ℓ, output margin read.

    Args:
        adapter: the model adapter (the prefix cache is computed from its current weights, once).
        tokenizer: the model's tokenizer.
        neutral_prompt: the neutral decoding context; the patch goes into its last token.
        max_batch_rows: at most this many (item, source layer) rows per forward of the patched position.
        min_band_rows: group adjacent source layers into one forward until it holds at least this many rows
            (wide matrix products are faster on CPU; rows of a band run from the band's first layer, so a
            wider band skips fewer blocks). ``1``: one forward per source layer, no block run in vain.

    Example:
        >>> traj = dipreg.trajectories(model, tok, pairs, lens="causal")  # doctest: +SKIP
        >>> lens = CausalLens(ModelAdapter(model), tok, neutral_prompt="x x\\ny y\\n?")  # doctest: +SKIP
        >>> dipreg.trajectories(model, tok, pairs, lens=lens)  # doctest: +SKIP

    A lens object is bound to the weights it saw when it was built: build a new one after changing them.
    """

    name = "causal"

    def __init__(
        self,
        adapter: ModelAdapter,
        tokenizer: Any,
        *,
        neutral_prompt: str = DEFAULT_NEUTRAL_PROMPT,
        max_batch_rows: int = 512,
        min_band_rows: int = 64,
    ) -> None:
        if max_batch_rows < 1 or min_band_rows < 1:
            raise ValueError(
                f"max_batch_rows and min_band_rows must be >= 1, got {max_batch_rows} and {min_band_rows}."
            )
        self.adapter = adapter
        self.neutral_prompt = neutral_prompt
        self.max_batch_rows = max_batch_rows
        self.min_band_rows = min_band_rows
        self.neutral_ids = neutral_token_ids(tokenizer, neutral_prompt)
        self._prefix = PrefixCache(adapter, self.neutral_ids[:-1])
        self._tuple_output = self._blocks_return_tuples()

    @torch.no_grad()
    def _blocks_return_tuples(self) -> bool:
        # Decoder blocks return a tensor or a tuple depending on the architecture and the transformers version.
        seen: list[bool] = []
        handle = self.adapter.layers[0].register_forward_hook(lambda _m, _i, out: seen.append(isinstance(out, tuple)))
        try:
            with self.adapter.eval_mode():
                last = torch.tensor([self.neutral_ids[-1:]], device=self.adapter.input_device)
                self.adapter.backbone(input_ids=last, past_key_values=self._prefix.expanded(1), use_cache=True)
        finally:
            handle.remove()
        return seen[0]

    def _band(self, n: int) -> int:
        """Source layers per forward for ``n`` items."""
        return max(1, min(self.adapter.num_layers, -(-self.min_band_rows // n)))

    @torch.no_grad()
    def margins(self, adapter: ModelAdapter, residuals: Tensor, pos_ids: Tensor, neg_ids: Tensor) -> Tensor:
        """``(L, N)`` output margins of the neutral context with ``residuals[ℓ]`` transplanted at layer ℓ."""
        if adapter.causal_lm is not self.adapter.causal_lm:
            raise ValueError("This CausalLens was built for another model; build one per model.")
        num_layers, n, dim = residuals.shape
        if num_layers != adapter.num_layers:
            raise ValueError(f"Expected residuals of {adapter.num_layers} layers, got {num_layers}.")
        flat = residuals.reshape(num_layers * n, dim)  # row r: source layer r // n, item r % n
        source = torch.arange(num_layers, device=flat.device).repeat_interleave(n)
        item = torch.arange(n, device=flat.device).repeat(num_layers)
        last_token = torch.tensor([[self.neutral_ids[-1]]], device=adapter.input_device)
        out = torch.empty(num_layers * n, dtype=torch.float32, device=flat.device)
        band = self._band(n)
        for first in range(0, num_layers, band):
            band_end = min(first + band, num_layers) * n
            for start in range(first * n, band_end, self.max_batch_rows):
                rows = slice(start, min(start + self.max_batch_rows, band_end))
                batch = rows.stop - rows.start
                with (
                    _skip_blocks(adapter, first + 1, self._tuple_output),
                    _patch_blocks(adapter, source[rows], flat[rows]) as final,
                ):
                    adapter.backbone(
                        input_ids=last_token.expand(batch, 1),
                        past_key_values=self._prefix.expanded(batch),
                        use_cache=True,
                    )
                out[rows] = adapter.margin(final[0], pos_ids[item[rows]], neg_ids[item[rows]]).float()
        return out.reshape(num_layers, n)


@torch.no_grad()
def naive_causal_margins(
    adapter: ModelAdapter,
    neutral_ids: list[int],
    residuals: Tensor,
    pos_ids: Tensor,
    neg_ids: Tensor,
) -> Tensor:
    """The reference transplant: one full forward of the whole neutral context per item per layer, a hook
    overwriting block ℓ's output at the last position, the margin read from the model's own output logits.

    Same inputs and output as :meth:`CausalLens.margins`; used by the tests and by ``dipreg bench``.
    """
    num_layers, n, _ = residuals.shape
    ids = torch.tensor([neutral_ids], device=adapter.input_device)
    out = torch.empty(num_layers, n)
    for layer_index, layer in enumerate(adapter.layers):
        for i in range(n):

            def hook(_module: nn.Module, _inputs: tuple, output: Tensor | tuple, h=residuals[layer_index, i]):
                hidden = output_tensor(output).clone()
                hidden[0, -1] = h
                return _replace_output(output, hidden)

            handle = layer.register_forward_hook(hook)
            try:
                logits = adapter.causal_lm(input_ids=ids, use_cache=False).logits[0, -1]
            finally:
                handle.remove()
            out[layer_index, i] = logits[int(pos_ids[i])].float() - logits[int(neg_ids[i])].float()
    return out
