"""Tokenising and batching of minimal-pair contexts: prompt rendering, right padding, the shared token prefix.

Contexts are interleaved (row ``2i`` is pair i's ``ctx_a``, ``2i+1`` its ``ctx_b``), sorted by length (less padding)
and right-padded so that every real token keeps its position id and each context is read at its own last token.
This module only turns text into tensors; it never runs the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dipreg.adapter import ModelAdapter
from dipreg.prompting import PromptFormat
from dipreg.stimuli import MinimalPair, StimulusError

DEFAULT_PROMPT = PromptFormat()


def max_positions(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None) if config is not None else None


def tokenize_contexts(
    tokenizer: Any, pairs: Sequence[MinimalPair], limit: int | None, prompt: PromptFormat
) -> list[list[int]]:
    """Token ids of ``ctx_a, ctx_b`` for every pair, interleaved; errors name every context that is too long."""
    texts = prompt.render_pairs(pairs, tokenizer)
    encoded = tokenizer(texts, add_special_tokens=prompt.add_special_tokens(tokenizer))["input_ids"]
    if limit is not None:
        too_long = [
            f"{pairs[i // 2].id} ({'ctx_a' if i % 2 == 0 else 'ctx_b'}: {len(ids)} tokens)"
            for i, ids in enumerate(encoded)
            if len(ids) > limit
        ]
        if too_long:
            raise StimulusError(
                f"{len(too_long)} context(s) exceed the model's window of {limit} tokens: "
                + ", ".join(too_long)
                + ". Shorten these contexts or use a model with a longer window."
            )
    if any(len(ids) == 0 for ids in encoded):
        empty = sorted({pairs[i // 2].id for i, ids in enumerate(encoded) if len(ids) == 0})
        raise StimulusError(f"Empty context(s) in {', '.join(empty)}: every context needs at least one token.")
    return encoded


def pad_right(batch: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Right-pad so that every real token keeps its position id; return ids, mask and last positions."""
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    last = torch.tensor([len(ids) - 1 for ids in batch])
    return input_ids.to(device), mask.to(device), last.to(device)


@dataclass(frozen=True)
class ContextBatch:
    """One right-padded batch of contexts: ``rows`` are indices into the interleaved context list."""

    rows: Tensor
    input_ids: Tensor
    attention_mask: Tensor
    last: Tensor


def shared_prefix_length(encoded: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix every context starts with, leaving each context at least its last token."""
    limit = min(len(ids) for ids in encoded) - 1
    length = 0
    while length < limit and len({ids[length] for ids in encoded}) == 1:
        length += 1
    return length


def _batches(
    encoded: list[list[int]], batch_size: int, pad_id: int, device: torch.device, skip: int = 0
) -> list[ContextBatch]:
    # Sort by length (less padding), drop the first ``skip`` tokens of every context, right-pad each batch.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        input_ids, mask, last = pad_right([encoded[i][skip:] for i in rows], pad_id, device)
        batches.append(ContextBatch(torch.tensor(rows), input_ids, mask, last))
    return batches


def pad_token_id(tokenizer: Any) -> int:
    """The id that fills right-padded positions: the tokenizer's pad token, else 0 (the mask hides it)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def context_batches(
    tokenizer: Any,
    pairs: Sequence[MinimalPair],
    batch_size: int,
    adapter: ModelAdapter,
    prompt: PromptFormat = DEFAULT_PROMPT,
) -> list[ContextBatch]:
    """Tokenize ``ctx_a, ctx_b`` of every pair (interleaved: row ``2i`` is pair i's a, ``2i+1`` its b), sort
    by length (less padding) and cut into right-padded batches on the device of the model's input embedding."""
    encoded = tokenize_contexts(tokenizer, pairs, max_positions(adapter.causal_lm), prompt)
    return _batches(encoded, batch_size, pad_token_id(tokenizer), adapter.input_device)


def shared_prefix_batches(
    tokenizer: Any,
    pairs: Sequence[MinimalPair],
    batch_size: int,
    adapter: ModelAdapter,
    prompt: PromptFormat = DEFAULT_PROMPT,
) -> tuple[list[int], list[ContextBatch]]:
    """:func:`context_batches` with the token prefix common to every context split off: returns that prefix
    (empty when there is none) and batches of what follows it (``last`` indexes into the suffix)."""
    encoded = tokenize_contexts(tokenizer, pairs, max_positions(adapter.causal_lm), prompt)
    skip = shared_prefix_length(encoded)
    return encoded[0][:skip], _batches(encoded, batch_size, pad_token_id(tokenizer), adapter.input_device, skip)
