"""Teacher-forced scoring of vignette options, per layer: the semantic margin and its trajectory (semantic dip).

For every vignette, context and option, the option phrase (leading space) is appended to the rendered prompt and
ONE forward captures the residual stream at the positions that predict the option's tokens. Through the lens
(final norm + unembedding) each layer gives the option's total log-probability ``Σ_k log p_ℓ(o_k | prompt, o_<k)``;
at ``ℓ = L`` this is the model's own teacher-forced log-probability. The same captured positions give the logits
of the option labels " A"/" B" at the answer position (the label readout) and of the two options' first differing
tokens (constrained decoding). Per context, ``margin = score(option correct in ctx_a) − score(the other)``; the
DiD over the pair's two contexts cancels length bias, as the paper's R3 readout. Log-probabilities need the full
vocabulary, but only at the few option positions, never at every position of the prompt.
This module measures; it never changes the model (eval mode, no grad, mode restored).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from rich.progress import track
from torch import Tensor, nn

from dipreg import metrics
from dipreg.adapter import ModelAdapter, eval_mode
from dipreg.batching import DEFAULT_PROMPT, pad_right, pad_token_id
from dipreg.prompting import PromptFormat
from dipreg.stimuli import StimulusError, Vignette
from dipreg.trajectory import Trajectories
from dipreg.validation import validate_window

#: The instruction of the scoring readouts (label, semantic, constrained): they all read the same prompt.
SCORING_INSTRUCTION = "Answer with one of the options."
#: What a score can be: the option's total log-probability, the label token's logit, or the branch token's logit.
ScoreKind = Literal["semantic", "label", "constrained"]
SCORE_KINDS: tuple[str, ...] = ("semantic", "label", "constrained")


def single_token_ids(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """The one token id of each text (e.g. ``" A"``); a clear error when one is not a single token."""
    ids = []
    for text in texts:
        toks = tokenizer.encode(text, add_special_tokens=False)
        if len(toks) != 1:
            raise StimulusError(f"The label {text!r} is {len(toks)} tokens for this tokenizer; it must be one token.")
        ids.append(toks[0])
    return ids


def option_token_ids(tokenizer: Any, vignette: Vignette) -> tuple[list[int], list[int], int]:
    """Token ids of both options (leading space) and the index of their first differing token.

    Raises :class:`StimulusError` naming the vignette when an option is empty or one option's tokens are a
    prefix of the other's (constrained decoding could not tell them apart).
    """
    first, second = (tokenizer.encode(" " + o, add_special_tokens=False) for o in vignette.options)
    if not first or not second:
        raise StimulusError(f"{vignette.id}: an option encodes to no tokens ({vignette.options!r}).")
    branch = next((j for j, (x, y) in enumerate(zip(first, second, strict=False)) if x != y), None)
    if branch is None:
        raise StimulusError(
            f"{vignette.id}: the tokens of one option are a prefix of the other's ({vignette.options!r}); "
            "reword the options so that they differ in a token both of them have."
        )
    return first, second, branch


@dataclass
class OptionScores:
    """Scores of every (vignette, context, option) at every layer read (all ``L``, or only the last).

    Attributes:
        vignettes: the vignettes, in input order.
        logprob: ``(N, 2, 2, L')`` total log-probability of option ``o`` in context ``c`` (0 = a, 1 = b).
        label: ``(N, 2, 2, L')`` logit of label ``" A"``/``" B"`` at the answer position.
        branch: ``(N, 2, 2, L')`` logit of each option's first differing token, after their shared prefix.
        layers: ``"all"`` (``L' = L``) or ``"last"`` (``L' = 1``).
    """

    vignettes: list[Vignette]
    logprob: Tensor
    label: Tensor
    branch: Tensor
    layers: str

    def margins(self, kind: ScoreKind) -> tuple[Tensor, Tensor]:
        """``(margin_a, margin_b)``, each ``(N, L')``: the score of the option correct in ``ctx_a`` minus the
        other's, in each context (labels follow their options)."""
        if kind not in SCORE_KINDS:
            raise ValueError(f"Unknown score kind {kind!r}; choose one of: {', '.join(SCORE_KINDS)}.")
        scores = {"semantic": self.logprob, "label": self.label, "constrained": self.branch}[kind]
        pos = torch.tensor([v.answer_a for v in self.vignettes])
        rows = torch.arange(len(self.vignettes))
        diff = scores[rows, :, pos] - scores[rows, :, 1 - pos]  # (N, 2, L')
        return diff[:, 0], diff[:, 1]

    def last(self) -> OptionScores:
        """The same scores at the last layer only."""
        return OptionScores(self.vignettes, self.logprob[..., -1:], self.label[..., -1:], self.branch[..., -1:], "last")

    def trajectories(self, kind: ScoreKind = "semantic", window: tuple[float, float] = metrics.DEFAULT_WINDOW):
        """The per-layer DiD of a score as :class:`~dipreg.trajectory.Trajectories` (lens name = ``kind``); its
        ``max_wrong_dip`` is the semantic (or label) dip. Needs scores of every layer."""
        if self.layers != "all":
            raise ValueError("Trajectories need the scores of every layer: call score_options(..., layers='all').")
        margin_a, margin_b = self.margins(kind)
        return Trajectories(pairs=self.vignettes, lens=kind, margin_a=margin_a, margin_b=margin_b, window=window)  # type: ignore[arg-type]


@dataclass(frozen=True)
class _Row:
    item: int
    ctx: int
    option: int
    ids: list[int]
    start: int  # index of the last prompt token: it predicts the option's first token
    targets: list[int]
    branch: int
    rivals: tuple[int, int]  # the two options' tokens at the branch index


def _rows(tokenizer: Any, vignettes: Sequence[Vignette], prompt: PromptFormat, instruction: str, limit: int | None):
    texts = [prompt.render(v.prompt(ctx, instruction), tokenizer) for v in vignettes for ctx in ("a", "b")]
    encoded = tokenizer(texts, add_special_tokens=prompt.add_special_tokens(tokenizer))["input_ids"]
    rows, too_long = [], []
    for i, v in enumerate(vignettes):
        options = option_token_ids(tokenizer, v)
        first, second, branch = options
        for c in (0, 1):
            prompt_ids = list(encoded[2 * i + c])
            for o in (0, 1):
                ids = prompt_ids + options[o]
                if limit is not None and len(ids) > limit:
                    too_long.append(f"{v.id} (ctx_{'ab'[c]}: {len(ids)} tokens)")
                start = len(prompt_ids) - 1
                rows.append(_Row(i, c, o, ids, start, options[o], branch, (first[branch], second[branch])))
    if too_long:
        raise StimulusError(
            f"{len(too_long)} prompt(s) exceed the model's window of {limit} tokens: {', '.join(too_long)}."
        )
    return rows


def _log_probs(adapter: ModelAdapter, normed: Tensor) -> Tensor:
    """Full-vocabulary log-softmax of already normed residuals (bias and softcap as the model's head)."""
    return adapter.apply_softcap(adapter.lm_head(normed).float()).log_softmax(-1)


@torch.no_grad()
def score_options(
    model: nn.Module,
    tokenizer: Any,
    vignettes: Sequence[Vignette],
    *,
    instruction: str = SCORING_INSTRUCTION,
    layers: Literal["all", "last"] = "all",
    prompt: PromptFormat = DEFAULT_PROMPT,
    batch_size: int = 16,
    progress: bool = False,
) -> OptionScores:
    """Score both options of every vignette in both contexts, at every layer (``"all"``) or the last one only.

    Rows (vignette x context x option) are sorted by length, right-padded and run ``batch_size`` at a time; each
    row's scores are read at its own positions, so batching does not change them.
    """
    vignettes = list(vignettes)
    if not vignettes:
        raise StimulusError("No vignettes given: pass at least one (see dipreg.stimuli.load_vignettes).")
    if layers not in ("all", "last"):
        raise ValueError(f"layers must be 'all' or 'last', got {layers!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    adapter = ModelAdapter(model)
    label_a, label_b = single_token_ids(tokenizer, (" A", " B"))
    limit = getattr(adapter.causal_lm.config, "max_position_embeddings", None)
    rows = _rows(tokenizer, vignettes, prompt, instruction, limit)
    order = sorted(range(len(rows)), key=lambda r: len(rows[r].ids))
    depth = adapter.num_layers if layers == "all" else 1
    shape = (len(vignettes), 2, 2, depth)
    logprob, label, branch = torch.zeros(shape), torch.zeros(shape), torch.zeros(shape)
    pad_id = pad_token_id(tokenizer)
    device = adapter.device  # where residuals are stacked and the head runs
    in_device = adapter.input_device  # token ids go to the embedding's device (under a device map not the head's)
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    with eval_mode(adapter.model):
        description = f"score options ({layers} layers)"
        for batch in track(batches, description=description, disable=not progress, transient=True):
            chunk = [rows[r] for r in batch]
            input_ids, mask, _ = pad_right([r.ids for r in chunk], pad_id, in_device)
            width = max(len(r.targets) for r in chunk)
            offsets = torch.arange(width)
            lengths = torch.tensor([len(r.targets) for r in chunk])
            valid = offsets[None] < lengths[:, None]  # (B, K)
            starts = torch.tensor([r.start for r in chunk])
            positions = starts[:, None] + torch.minimum(offsets[None], lengths[:, None] - 1)
            targets = torch.tensor([r.targets + [r.targets[-1]] * (width - len(r.targets)) for r in chunk])
            branch_at = torch.tensor([r.branch for r in chunk])
            rivals = torch.tensor([r.rivals for r in chunk])
            residuals = adapter.residuals(input_ids, mask, positions.to(in_device))  # (L, B, K, D)
            if layers == "last":
                residuals = residuals[-1:]
            index = (
                torch.tensor([r.item for r in chunk]),
                torch.tensor([r.ctx for r in chunk]),
                torch.tensor([r.option for r in chunk]),
            )
            rows_b = torch.arange(len(chunk))
            for layer in range(residuals.shape[0]):
                normed = adapter.final_norm(residuals[layer])  # (B, K, D)
                lp = _log_probs(adapter, normed).cpu()
                token_lp = lp.gather(-1, targets[..., None]).squeeze(-1)
                logprob[(*index, layer)] = (token_lp * valid).sum(-1)
                at_answer = normed[:, 0]
                for slot, label_id in enumerate((label_a, label_b)):
                    ids = torch.full((len(chunk),), label_id, device=device)
                    label[(*index[:2], torch.full_like(index[2], slot), layer)] = (
                        adapter.unembed_rows(at_answer, ids).float().cpu()
                    )
                at_branch = normed[rows_b.to(device), branch_at.to(device)]
                for slot in (0, 1):
                    logits = adapter.unembed_rows(at_branch, rivals[:, slot].to(device)).float().cpu()
                    branch[(*index[:2], torch.full_like(index[2], slot), layer)] = logits
    return OptionScores(vignettes, logprob, label, branch, layers)


def semantic_trajectories(
    model: nn.Module,
    tokenizer: Any,
    vignettes: Sequence[Vignette],
    *,
    window: tuple[float, float] = metrics.DEFAULT_WINDOW,
    prompt: PromptFormat | str = DEFAULT_PROMPT,
    batch_size: int = 16,
    progress: bool = False,
) -> Trajectories:
    """The per-layer DiD of the semantic margin (logit lens on every option position), one row per vignette.

    ``max_wrong_dip`` of the result is the *semantic dip*; at ``ℓ = L`` the DiD equals the semantic readout's.

    Example:
        >>> traj = semantic_trajectories(model, tok, load_vignettes("role_binding"))  # doctest: +SKIP
        >>> traj.max_wrong_dip  # doctest: +SKIP
    """
    prompt = PromptFormat(prompt) if isinstance(prompt, str) else prompt
    window = validate_window(window)
    scores = score_options(model, tokenizer, vignettes, prompt=prompt, batch_size=batch_size, progress=progress)
    return scores.trajectories("semantic", window)
