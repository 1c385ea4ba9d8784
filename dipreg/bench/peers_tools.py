"""The tools `dipreg bench --peers` puts side by side, behind one small interface.

A tool is built once on a model and a set of :class:`PeerInputs` (the same token ids, candidates and neutral prompt
for every tool) and then answers ``margins(lens)``: ``(2N, L)`` margins ``logit(t_pos) − logit(t_neg)`` per context
(interleaved: row ``2i`` is pair i's ``ctx_a``, ``2i+1`` its ``ctx_b``) and per layer. ``dipreg`` is the reference;
the peers live one per module (``peers_transformer_lens``, ``peers_nnsight``, ``peers_nnterp``) and are imported only
when they are built, so a missing package costs nothing until its tool is asked for.

Peers get left-padded batches (nnterp requires them and reads the last position; transformers derives the position
ids of a left-padded row from its attention mask). This module measures; it never changes the model it is given.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from dipreg.batching import DEFAULT_PROMPT, pad_token_id, tokenize_contexts
from dipreg.lenses.causal import DEFAULT_NEUTRAL_PROMPT
from dipreg.prompting import PromptFormat
from dipreg.stimuli import MinimalPair, candidate_token_ids
from dipreg.trajectory import trajectories


@dataclass(frozen=True)
class LeftBatch:
    """One left-padded batch: ``rows`` index the interleaved contexts; ``texts`` are the strings they render to."""

    rows: Tensor
    input_ids: Tensor
    attention_mask: Tensor
    texts: list[str]


@dataclass(frozen=True)
class PeerInputs:
    """What every tool reads: the pairs, their contexts as tokens and text, the candidates and the neutral prompt."""

    pairs: list[MinimalPair]
    encoded: list[list[int]]
    batches: list[LeftBatch]
    pos_ids: Tensor
    neg_ids: Tensor
    neutral_prompt: str
    batch_size: int
    prompt: PromptFormat

    @property
    def num_contexts(self) -> int:
        """``2N``."""
        return len(self.encoded)


def peer_inputs(
    tokenizer: Any,
    pairs: Sequence[MinimalPair],
    batch_size: int,
    *,
    neutral_prompt: str = DEFAULT_NEUTRAL_PROMPT,
    prompt: PromptFormat = DEFAULT_PROMPT,
) -> PeerInputs:
    """Tokenize the contexts exactly as dipreg does, sort them by length and cut left-padded batches (on the CPU)."""
    pairs = list(pairs)
    texts = [prompt.render(ctx, tokenizer) for p in pairs for ctx in (p.ctx_a, p.ctx_b)]
    encoded = tokenize_contexts(tokenizer, pairs, None, prompt)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    pad = pad_token_id(tokenizer)
    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, i in enumerate(rows):
            ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]) :] = 1
        batches.append(LeftBatch(torch.tensor(rows), ids, mask, [texts[i] for i in rows]))
    pos, neg = candidate_token_ids(pairs, tokenizer)
    return PeerInputs(
        pairs=pairs,
        encoded=encoded,
        batches=batches,
        pos_ids=torch.tensor(pos).repeat_interleave(2),
        neg_ids=torch.tensor(neg).repeat_interleave(2),
        neutral_prompt=neutral_prompt,
        batch_size=batch_size,
        prompt=prompt,
    )


def pick(scores: Tensor, token_ids: Tensor) -> Tensor:
    """``scores[..., b, token_ids[b]]`` of full-vocabulary ``(..., B, V)`` scores, as float32."""
    index = token_ids.to(scores.device).view(-1, 1).expand(*scores.shape[:-1], 1)
    return scores.gather(-1, index)[..., 0].float()


def pick_margins(scores: Tensor, pos_ids: Tensor, neg_ids: Tensor) -> Tensor:
    """``scores[..., b, pos_b] − scores[..., b, neg_b]`` of full-vocabulary ``(..., B, V)`` scores, as float32."""
    return pick(scores, pos_ids) - pick(scores, neg_ids)


class PeerRunner(Protocol):
    """A tool built on one model and one :class:`PeerInputs`."""

    lenses: tuple[str, ...]

    def margins(self, lens: str) -> Tensor:
        """``(2N, L)`` margins of every context at every layer under ``lens`` (one of :attr:`lenses`)."""
        ...


class DipregRunner:
    """dipreg itself, through the public call a user makes: :func:`dipreg.trajectories`."""

    lenses = ("logit", "causal")

    def __init__(self, model: nn.Module, tokenizer: Any, inputs: PeerInputs) -> None:
        self.model, self.tokenizer, self.inputs = model, tokenizer, inputs

    def margins(self, lens: str) -> Tensor:
        """``(2N, L)`` interleaved margins from :func:`dipreg.trajectories`."""
        options = {"neutral_prompt": self.inputs.neutral_prompt} if lens == "causal" else {}
        traj = trajectories(
            self.model,
            self.tokenizer,
            self.inputs.pairs,
            lens=lens,
            batch_size=self.inputs.batch_size,
            prompt=self.inputs.prompt,
            **options,
        )
        return torch.stack([traj.margin_a, traj.margin_b], dim=1).reshape(self.inputs.num_contexts, -1)


@dataclass(frozen=True)
class PeerTool:
    """A tool: the packages it needs, the lenses it offers, and where its runner class lives."""

    name: str
    packages: tuple[str, ...]
    lenses: tuple[str, ...]
    runner: str

    def missing(self) -> list[str]:
        """The packages of this tool that are not installed."""
        return [name for name in self.packages if importlib.util.find_spec(name) is None]

    def build(self, model: nn.Module, tokenizer: Any, inputs: PeerInputs) -> PeerRunner:
        """Import the tool and build its runner on ``model`` (peers may change the model they wrap: pass a copy)."""
        module, _, cls = self.runner.partition(":")
        return getattr(importlib.import_module(module), cls)(model, tokenizer, inputs)


#: dipreg first (the reference), then the peers, in table order.
TOOLS: dict[str, PeerTool] = {
    tool.name: tool
    for tool in (
        PeerTool("dipreg", (), ("logit", "causal"), "dipreg.bench.peers_tools:DipregRunner"),
        PeerTool(
            "transformer_lens",
            ("transformer_lens",),
            ("logit",),
            "dipreg.bench.peers_transformer_lens:TransformerLensRunner",
        ),
        PeerTool("nnsight", ("nnsight",), ("logit",), "dipreg.bench.peers_nnsight:NNsightRunner"),
        PeerTool("nnterp", ("nnterp", "nnsight"), ("logit", "causal"), "dipreg.bench.peers_nnterp:NNterpRunner"),
    )
}
