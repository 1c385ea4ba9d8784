"""How a minimal-pair context is shown to the model: as raw text, inside the model's chat template, or after a
few worked examples.

Stimuli are written as plain text ending in an answer cue ("... ? Answer (Yes or No):"). Instruct models read
them far better as a chat turn: the question becomes the user message and the assistant turn opens with
the cue, so the next token is the answer (candidates keep their leading space). The few-shot style shows
``shots`` other pairs of the same family first, each as one of its contexts followed by its correct answer.
Only the formatting lives here; the contexts themselves are never changed.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from dipreg.stimuli import MinimalPair, StimulusError
from dipreg.validation import validate_count

PromptStyle = Literal["auto", "raw", "chat", "fewshot"]
#: The style ``dipreg audit`` renders contexts in unless told otherwise (and the in-domain tuned-lens corpus with it).
DEFAULT_AUDIT_PROMPT: PromptStyle = "fewshot"
#: Every style; ``fewshot`` needs the whole pair set (:meth:`PromptFormat.render_pairs`).
PROMPT_STYLES: tuple[str, ...] = ("auto", "raw", "chat", "fewshot")
#: The styles that render one context on its own (vignette readouts, generation).
SINGLE_CONTEXT_STYLES: tuple[str, ...] = ("auto", "raw", "chat")
#: Worked examples per item in the ``fewshot`` style unless ``shots`` says otherwise.
DEFAULT_SHOTS = 3
#: Between two worked examples, and between the last one and the item's context.
SHOT_SEPARATOR = "\n\n"

# The trailing answer cue: text after the last sentence end ("?", "." or newline) that starts with "Answer".
_CUE = re.compile(r"^(?P<question>.*[?.\n])\s*(?P<cue>Answer\b[^?.\n]*)$", re.DOTALL)


@dataclass(frozen=True)
class PromptFormat:
    """Turns a context into the exact string the model reads.

    Args:
        style: ``"raw"`` (the context as is), ``"chat"`` (the tokenizer's chat template, question as the user
            turn, ``answer_prefix`` opening the assistant turn), ``"auto"`` (chat when the tokenizer has a
            chat template, else raw) or ``"fewshot"`` (raw text: ``shots`` worked examples, then the context).
        answer_prefix: the text that opens the assistant turn in chat style.
        shots: worked examples per item in the ``fewshot`` style (fewer when the item's family has fewer other
            pairs in the set).
        seed: seeds the choice of worked examples (``fewshot``).
        pool: the pairs ``fewshot`` draws worked examples from; ``None`` (default): the pairs being rendered.
            Bind the whole set with :meth:`with_pool` before rendering a part of it (a shard, a batch), so
            that the examples do not depend on how the set was split.

    In the ``fewshot`` style a worked example is another pair of the same family in the set being measured
    (never the item itself, nor a pair sharing one of its contexts; a context repeated under several ids counts
    once): one of its two contexts, chosen at
    random, followed by that context's correct answer. Examples are separated by :data:`SHOT_SEPARATOR` and
    the item's context comes last. Both contexts of a pair read the same examples, so the pair still differs
    only in its polarity operator. The choice depends only on ``seed``, the item's id and the ids of the set
    (not on its order): ``random.Random(f"{seed}:{item id}")`` samples from the candidates sorted by id.

    Example:
        >>> PromptFormat("fewshot", shots=2).render_pairs(pairs, tokenizer)  # doctest: +SKIP
    """

    style: PromptStyle = "auto"
    answer_prefix: str = "Answer:"
    shots: int = DEFAULT_SHOTS
    seed: int = 0
    pool: tuple[MinimalPair, ...] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.style not in PROMPT_STYLES:
            raise ValueError(f"Unknown prompt style {self.style!r}; choose one of: {', '.join(PROMPT_STYLES)}.")
        validate_count(self.shots, "shots", 1, "worked examples per item")

    def resolved(self, tokenizer: Any) -> str:
        """The concrete style (``"raw"``, ``"chat"`` or ``"fewshot"``) for this tokenizer."""
        if self.style == "auto":
            return "chat" if getattr(tokenizer, "chat_template", None) else "raw"
        if self.style == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt style 'chat' needs a tokenizer with a chat template; use 'raw' or 'auto'.")
        return self.style

    def describe(self, tokenizer: Any) -> str:
        """The resolved style in words, e.g. ``"auto → chat"`` or ``"fewshot (3 worked examples, seed 0)"``."""
        resolved = self.resolved(tokenizer)
        if resolved == "fewshot":
            return f"fewshot ({self.shots} worked examples of the same family per item, seed {self.seed})"
        return f"{self.style} → {resolved}" if self.style != resolved else resolved

    def render(self, context: str, tokenizer: Any) -> str:
        """The string the model reads for ``context`` (``raw``, ``chat`` and ``auto``; ``fewshot`` needs the
        pair set: :meth:`render_pairs`)."""
        resolved = self.resolved(tokenizer)
        if resolved == "fewshot":
            raise ValueError(
                "prompt style 'fewshot' draws worked examples from the other pairs of a set, so it renders whole "
                f"pair sets only (minimal-pair commands); here use one of: {', '.join(SINGLE_CONTEXT_STYLES)}."
            )
        if resolved == "raw":
            return context
        match = _CUE.match(context.strip())
        question = match.group("question").strip() if match else context.strip()
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        return chat + self.answer_prefix

    def with_pool(self, pool: Sequence[MinimalPair]) -> PromptFormat:
        """This format drawing its ``fewshot`` examples from ``pool`` (other styles are returned unchanged)."""
        return replace(self, pool=tuple(pool)) if self.style == "fewshot" else self

    def render_pairs(self, pairs: Sequence[MinimalPair], tokenizer: Any) -> list[str]:
        """The strings of ``ctx_a, ctx_b`` of every pair, interleaved (row ``2i`` is pair i's ``ctx_a``);
        ``fewshot`` draws its worked examples from :attr:`pool` (default: ``pairs`` themselves)."""
        if self.resolved(tokenizer) != "fewshot":
            return [self.render(ctx, tokenizer) for p in pairs for ctx in (p.ctx_a, p.ctx_b)]
        by_family: dict[str, list[MinimalPair]] = {}
        seen: set[str] = set()
        for candidate in sorted(self.pool if self.pool is not None else pairs, key=lambda p: p.id):
            if not seen & {candidate.ctx_a, candidate.ctx_b}:  # a set may repeat a context under two ids
                by_family.setdefault(candidate.family, []).append(candidate)
                seen |= {candidate.ctx_a, candidate.ctx_b}
        texts = []
        for pair in pairs:
            prefix = "".join(ctx + answer + SHOT_SEPARATOR for ctx, answer in self.worked_examples(pair, by_family))
            texts += [prefix + pair.ctx_a, prefix + pair.ctx_b]
        return texts

    def worked_examples(self, pair: MinimalPair, by_family: dict[str, list[MinimalPair]]) -> list[tuple[str, str]]:
        """``(context, correct answer)`` of the worked examples shown before ``pair`` (``fewshot``).

        ``by_family`` maps a family to its candidate pairs sorted by id. Raises :class:`StimulusError` when the
        family holds no other pair.
        """
        own = {pair.ctx_a, pair.ctx_b}
        candidates = [c for c in by_family.get(pair.family, []) if c.id != pair.id and not own & {c.ctx_a, c.ctx_b}]
        if not candidates:
            raise StimulusError(
                f"prompt style 'fewshot': item {pair.id!r} is the only pair of family {pair.family!r} in the set, so "
                "there is no other pair to show as a worked example. Add pairs of that family or use another style."
            )
        rng = random.Random(f"{self.seed}:{pair.id}")
        chosen = rng.sample(candidates, min(self.shots, len(candidates)))
        return [(c.ctx_a, c.t_pos) if rng.random() < 0.5 else (c.ctx_b, c.t_neg) for c in chosen]

    def add_special_tokens(self, tokenizer: Any) -> bool:
        """Raw and few-shot text get the tokenizer's usual special tokens; a chat template already holds them."""
        return self.resolved(tokenizer) != "chat"
