"""Layer-wise DiD trajectories of minimal pairs: one batched forward per context, two unembedding rows.

Data flows stimuli -> tokens -> residuals at the answer position (hooks) -> lens margins -> DiD -> statistics.
This module measures; it never changes the model (eval mode and no grad for the call, mode restored after).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import Tensor, nn

from dipreg import metrics
from dipreg.adapter import ModelAdapter, eval_mode
from dipreg.batching import DEFAULT_PROMPT, context_batches, shared_prefix_batches
from dipreg.kv_prefix import PrefixCache
from dipreg.lenses import Lens, resolve_lens
from dipreg.prompting import PromptFormat
from dipreg.stimuli import MinimalPair, StimulusError, candidate_token_ids
from dipreg.validation import validate_window

#: An item whose internal preference still disagrees with the output at or beyond this relative depth
#: binds its answer late (the paper's "late-binding rate").
LATE_BINDING_DEPTH = 0.90

#: A subset whose contexts are answered with one candidate in at least this share at the last layer is degenerate:
#: the model gives the same answer whatever the context, so ``accuracy`` (``DiD(L) > 0``) then measures only how the
#: margin moves between the two contexts, and ``strict_accuracy`` is the honest number.
DEGENERATE_SHARE = 0.95


def answer_shares(margin_a: Tensor, margin_b: Tensor) -> tuple[float, float]:
    """``(answer_pos_share, answer_neg_share)``: the share of the ``2N`` contexts answered ``t_pos`` / ``t_neg``.

    A context is answered ``t_pos`` when its last-layer margin is > 0 and ``t_neg`` when it is < 0; an exact tie
    (margin 0) or a non-finite margin counts in neither, so the two shares may sum to less than 1.
    """
    last = torch.cat([margin_a[..., -1], margin_b[..., -1]])
    if last.numel() == 0:
        return 0.0, 0.0
    total = last.numel()  # exact counts over the total, so 38 of 40 is exactly 0.95 (a float32 mean is not)
    return int((last > 0).sum()) / total, int((last < 0).sum()) / total


def degenerate_answer(summary: dict[str, Any], share: float = DEGENERATE_SHARE) -> dict[str, Any] | None:
    """``{"side": "t_pos"|"t_neg", "share": s}`` when one candidate answers ``≥ share`` of the contexts of a
    subset summary (:meth:`Trajectories.subset_summary`), else ``None``."""
    for side, key in (("t_pos", "answer_pos_share"), ("t_neg", "answer_neg_share")):
        if summary.get("n") and summary[key] >= share:
            return {"side": side, "share": summary[key]}
    return None


@dataclass
class Trajectories:
    """DiD trajectories of a set of minimal pairs under one lens.

    Attributes:
        pairs: the pairs, in input order.
        lens: the lens name.
        margin_a: ``(N, L)`` margins of ``ctx_a`` per layer.
        margin_b: ``(N, L)`` margins of ``ctx_b`` per layer.
        window: relative-depth window of ``max_wrong_dip``.
    """

    pairs: list[MinimalPair]
    lens: str
    margin_a: Tensor
    margin_b: Tensor
    window: tuple[float, float] = metrics.DEFAULT_WINDOW
    did: Tensor = field(init=False)
    max_wrong_dip: Tensor = field(init=False)
    commit_layer_frac: Tensor = field(init=False)
    correct: Tensor = field(init=False)
    strict_correct: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.did = self.margin_a - self.margin_b
        self.max_wrong_dip = metrics.max_wrong_dip(self.did, self.window)
        self.commit_layer_frac = metrics.commit_layer_frac(self.did)
        self.correct = metrics.pair_correct(self.did)
        self.strict_correct = metrics.strict_correct(self.margin_a, self.margin_b)

    @property
    def num_layers(self) -> int:
        """``L``."""
        return self.did.shape[-1]

    def item_records(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per item (DiD and both margins over layers plus the statistics)."""
        return [
            {
                "id": pair.id,
                "family": pair.family,
                "safety": pair.safety,
                "category": pair.category,
                "did": self.did[i].tolist(),
                "margin_a": self.margin_a[i].tolist(),
                "margin_b": self.margin_b[i].tolist(),
                "max_wrong_dip": float(self.max_wrong_dip[i]),
                "commit_layer_frac": float(self.commit_layer_frac[i]),
                "correct": bool(self.correct[i]),
                "strict_correct": bool(self.strict_correct[i]),
            }
            for i, pair in enumerate(self.pairs)
        ]

    def subset_summary(self, mask: Tensor) -> dict[str, float]:
        """Accuracy, strict accuracy, mean dip, mean commit, late-binding rate and answer shares over ``mask``.

        ``answer_pos_share`` / ``answer_neg_share``: the share of the subset's ``2n`` contexts whose last-layer
        margin is > 0 (answered ``t_pos``) / < 0 (answered ``t_neg``); an exact tie counts in neither (see
        :func:`answer_shares`). One share near 1 means the model gives the same answer in every context.
        """
        n = int(mask.sum())
        if n == 0:
            return {"n": 0}
        pos_share, neg_share = answer_shares(self.margin_a[mask], self.margin_b[mask])
        return {
            "n": n,
            "accuracy": float(self.correct[mask].float().mean()),
            "strict_accuracy": float(self.strict_correct[mask].float().mean()),
            "mean_max_wrong_dip": float(self.max_wrong_dip[mask].mean()),
            "mean_commit_layer_frac": float(self.commit_layer_frac[mask].mean()),
            "late_binding_rate": float((self.commit_layer_frac[mask] >= LATE_BINDING_DEPTH).float().mean()),
            "answer_pos_share": pos_share,
            "answer_neg_share": neg_share,
        }

    def summary(self) -> dict[str, Any]:
        """Summary over all items, per family, and over the safety subset."""
        fam_of = [p.family for p in self.pairs]
        families = sorted(set(fam_of))
        safety = torch.tensor([p.safety for p in self.pairs], dtype=torch.bool)
        return {
            "lens": self.lens,
            "num_layers": self.num_layers,
            "window": list(self.window),
            "all": self.subset_summary(torch.ones(len(self.pairs), dtype=torch.bool)),
            "families": {
                f: self.subset_summary(torch.tensor([g == f for g in fam_of], dtype=torch.bool)) for f in families
            },
            "safety": self.subset_summary(safety),
        }


def progress_bar(*, disable: bool = False) -> Progress:
    """A transient rich progress bar counting contexts: description, bar, ``done/total contexts``, elapsed, ETA."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("contexts"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=disable,
        transient=True,
    )


@torch.no_grad()
def context_margins(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[MinimalPair],
    lenses: Sequence[Lens],
    *,
    batch_size: int = 16,
    progress: bool = False,
    adapter: ModelAdapter | None = None,
    prompt: PromptFormat = DEFAULT_PROMPT,
    share_prefix: bool = True,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-layer margins of ``ctx_a`` and ``ctx_b`` for every pair, ``(N, L)`` each, in input order, per lens.

    One forward per batch captures the residuals, and every lens reads the same residuals (no forward per
    lens). Contexts are right-padded and read at their own last token, so a batched run equals one-at-a-time
    runs. With ``share_prefix`` the token prefix common to every context (a chat template's system and user
    header) runs once into a key/value cache that every batch continues; the margins are the same up to
    floating-point rounding.
    """
    adapter = adapter or ModelAdapter(model)
    pos, neg = candidate_token_ids(pairs, tokenizer)
    pos_ids = torch.tensor(pos).repeat_interleave(2).to(adapter.device)
    neg_ids = torch.tensor(neg).repeat_interleave(2).to(adapter.device)
    prefix_ids, batches = (
        shared_prefix_batches(tokenizer, pairs, batch_size, adapter, prompt)
        if share_prefix
        else ([], context_batches(tokenizer, pairs, batch_size, adapter, prompt))
    )
    out = {lens.name: torch.empty(2 * len(pairs), adapter.num_layers) for lens in lenses}
    description = escape("+".join(out) + " lens")  # lens names are text, never markup
    with eval_mode(adapter.model), progress_bar(disable=not progress) as bar:
        task = bar.add_task(description, total=2 * len(pairs))
        prefix = PrefixCache(adapter, prefix_ids) if prefix_ids else None
        for batch in batches:
            residuals = adapter.residuals(batch.input_ids, batch.attention_mask, batch.last, prefix)
            rows = batch.rows.to(adapter.device)
            for lens in lenses:
                margins = lens.margins(adapter, residuals, pos_ids[rows], neg_ids[rows])
                out[lens.name][batch.rows] = margins.float().T.cpu()
            bar.advance(task, len(batch.rows))
    return {name: (m[0::2], m[1::2]) for name, m in out.items()}


def trajectories_by_lens(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[MinimalPair],
    lenses: Sequence[str | Lens],
    *,
    batch_size: int = 16,
    window: tuple[float, float] = metrics.DEFAULT_WINDOW,
    prompt: PromptFormat | str = DEFAULT_PROMPT,
    progress: bool = False,
    lens_options: dict[str, dict[str, Any]] | None = None,
    share_prefix: bool = True,
) -> dict[str, Trajectories]:
    """:func:`trajectories` under several lenses from ONE forward pass per batch, keyed by lens name.

    ``lens_options[name]`` is passed to the factory of lens ``name``; ``share_prefix`` runs the prefix common
    to every context once (see :func:`context_margins`).
    """
    pairs = list(pairs)
    if not pairs:
        raise StimulusError("No minimal pairs given: pass at least one pair (see dipreg.stimuli.load_pairs).")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if not lenses:
        raise ValueError("Name at least one lens (e.g. 'logit').")
    window = validate_window(window)
    prompt = PromptFormat(prompt) if isinstance(prompt, str) else prompt
    adapter = ModelAdapter(model)
    options = lens_options or {}
    built = [
        resolve_lens(lens, adapter, tokenizer, **(options.get(lens, {}) if isinstance(lens, str) else {}))
        for lens in lenses
    ]
    margins = context_margins(
        model,
        tokenizer,
        pairs,
        built,
        batch_size=batch_size,
        progress=progress,
        adapter=adapter,
        prompt=prompt,
        share_prefix=share_prefix,
    )
    return {
        name: Trajectories(pairs=pairs, lens=name, margin_a=a, margin_b=b, window=window)
        for name, (a, b) in margins.items()
    }


def trajectories(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[MinimalPair],
    lens: str | Lens = "logit",
    *,
    batch_size: int = 16,
    window: tuple[float, float] = metrics.DEFAULT_WINDOW,
    prompt: PromptFormat | str = DEFAULT_PROMPT,
    progress: bool = False,
    share_prefix: bool = True,
    **lens_options: Any,
) -> Trajectories:
    """Measure the DiD trajectory of every minimal pair.

    Args:
        model: an HF causal LM (PEFT-wrapped or not).
        tokenizer: its tokenizer; every candidate must be one token for it (audited, errors name the items).
        pairs: the minimal pairs.
        lens: ``"logit"`` (default), another registered lens name, or a :class:`~dipreg.lenses.Lens`.
        batch_size: contexts per forward pass.
        window: relative-depth window of ``max_wrong_dip``.
        prompt: how contexts are shown to the model: a :class:`~dipreg.prompting.PromptFormat` or a style
            name (``"auto"``: the chat template when the tokenizer has one, else raw text).
        progress: show a progress bar.
        share_prefix: run the token prefix common to every context once into a key/value cache that every batch
            continues (same margins up to rounding); ``False`` runs every context whole.
        **lens_options: passed to the lens factory (an option the lens does not take is an error).

    Returns:
        :class:`Trajectories` with DiD, margins and item statistics.

    Example:
        >>> model, tok = dipreg.load_model()  # doctest: +SKIP
        >>> traj = dipreg.trajectories(model, tok, dipreg.stimuli.load_pairs("core"))  # doctest: +SKIP
        >>> traj.summary()["all"]["accuracy"]  # doctest: +SKIP
    """
    options = {lens: lens_options} if isinstance(lens, str) else {}
    by_lens = trajectories_by_lens(
        model,
        tokenizer,
        pairs,
        [lens],
        batch_size=batch_size,
        window=window,
        prompt=prompt,
        progress=progress,
        lens_options=options,
        share_prefix=share_prefix,
    )
    return next(iter(by_lens.values()))
