"""Batched decoding helpers of the readouts: greedy generation and next-token logits of given tokens.

Prompts are left-padded (generation continues every row from its own last token); ``generate`` gets the
attention mask, so padding does not change a row's result beyond float noise. No grad, eval mode, the model's
previous mode restored; the tokenizer is never modified.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from rich.progress import track
from torch import Tensor, nn
from transformers import GenerationConfig

from dipreg.adapter import ModelAdapter, eval_mode
from dipreg.batching import pad_right
from dipreg.prompting import PromptFormat


def _pad_id(tokenizer: Any) -> int:
    # Not dipreg.trajectory.pad_token_id: generate() also writes this id after a row's end-of-sequence, so
    # without a pad token it must be EOS (dropped by skip_special_tokens), not token 0.
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(tokenizer.eos_token_id) if tokenizer.eos_token_id is not None else 0


def _left_pad(batch: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        mask[row, width - len(ids) :] = 1
    return input_ids.to(device), mask.to(device)


def _encode(tokenizer: Any, texts: Sequence[str], prompt: PromptFormat) -> list[list[int]]:
    rendered = [prompt.render(t, tokenizer) for t in texts]
    return tokenizer(rendered, add_special_tokens=prompt.add_special_tokens(tokenizer))["input_ids"]


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_new_tokens: int,
    prompt: PromptFormat,
    batch_size: int = 16,
    progress: bool = False,
    description: str = "generate",
) -> list[str]:
    """Greedy continuation of every text (rendered by ``prompt``), decoded without special tokens, in input order.

    Generation stops at the model's end-of-sequence token or after ``max_new_tokens``.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    adapter = ModelAdapter(model)
    encoded = _encode(tokenizer, texts, prompt)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    pad_id = _pad_id(tokenizer)
    eos = adapter.causal_lm.generation_config.eos_token_id
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
        eos_token_id=eos if eos is not None else tokenizer.eos_token_id,
    )
    out: list[str] = [""] * len(texts)
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    with eval_mode(adapter.model):
        for batch in track(batches, description=description, disable=not progress, transient=True):
            input_ids, mask = _left_pad([encoded[i] for i in batch], pad_id, adapter.device)
            generated = adapter.causal_lm.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
            new = generated[:, input_ids.shape[1] :]
            for row, i in enumerate(batch):
                out[i] = tokenizer.decode(new[row], skip_special_tokens=True).strip()
    return out


@torch.no_grad()
def next_token_logits(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    token_ids: Sequence[int],
    *,
    prompt: PromptFormat,
    batch_size: int = 16,
) -> Tensor:
    """``(N, len(token_ids))`` logits of the given tokens as the next token after each text (two-row unembedding
    at the last position, never the full vocabulary)."""
    adapter = ModelAdapter(model)
    encoded = _encode(tokenizer, texts, prompt)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out = torch.zeros(len(texts), len(token_ids))
    with eval_mode(adapter.model):
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            input_ids, mask, last = pad_right([encoded[i] for i in batch], _pad_id(tokenizer), adapter.device)
            at_last = adapter.final_norm(adapter.residuals(input_ids, mask, last)[-1])
            for slot, token in enumerate(token_ids):
                ids = torch.full((len(batch),), token, device=adapter.device)
                out[torch.tensor(batch), slot] = adapter.unembed_rows(at_last, ids).float().cpu()
    return out
