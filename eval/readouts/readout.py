"""Readouts: the interfaces that turn a model's processing of a vignette into an A/B decision (paper §5.6).

Every readout has the same call, ``readout(model, tokenizer, vignettes, session) -> ReadoutResult``, with one
decision per context (the option index, or None for no decision) and a margin where the readout has one:

========== ====== ===================================================================================
name       margin decision
========== ====== ===================================================================================
label      yes    R2: logit of the label " A" vs " B" after ``Answer:`` (a constrained label choice)
semantic   yes    R3/L1: teacher-forced total log-prob of each full option phrase
constrained yes   L2: greedy decoding restricted to the two option strings; with two options it is decided
                  at their first differing token, whose logit gap is the margin
extractive no     L3: short greedy answer asked to copy an option; the option phrase copied first
free       no     R1/L4: a free one-sentence answer; rule-based A/B extraction (``dipreg.eval.readouts.extraction``)
judge      judge  free answer classified by a separate judge model (any HF causal LM) as choosing A or B
========== ====== ===================================================================================

Margins follow ``docs/method.md`` ("Layers, margins, DiD"): per context, the score of the option correct in
``ctx_a`` minus the other's; the pair's ``DiD = margin_a − margin_b``. Pair correctness: label and semantic compare
at the DiD level (``DiD > 0``, which cancels option-length and position bias); the generative readouts need both
contexts answered correctly (a generated answer has no graded score). ``strict_correct`` (both contexts right) is
reported for every readout. The label, semantic and constrained readouts read the same prompt, so a
:class:`ReadoutSession` runs ONE scoring pass for all three. Readouts measure only: no grad, eval mode, the model's
previous mode restored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
from torch import Tensor, nn

from dipreg.batching import DEFAULT_PROMPT
from dipreg.eval.readouts.extraction import ExtractionMode, extract_choice
from dipreg.eval.readouts.generation import greedy_generate, next_token_logits
from dipreg.prompting import PromptFormat
from dipreg.semantic import OptionScores, ScoreKind, score_options, single_token_ids
from dipreg.stimuli import Vignette

PairRule = Literal["did", "both"]
EXTRACTIVE_INSTRUCTION = "Answer with the exact words of the correct option and nothing else."
FREE_INSTRUCTION = "Answer in one short sentence and say why."
JUDGE_TEMPLATE = (
    'Question: {question}\nA) {first}\nB) {second}\nResponse: "{response}"\n'
    "Which option does the response choose, A or B?\nAnswer:"
)
#: What ``dipreg bridge`` runs without ``--readouts``.
DEFAULT_READOUTS: tuple[str, ...] = ("label", "semantic", "constrained", "extractive", "free")


class ReadoutError(ValueError):
    """Unknown readout name or unusable readout settings."""


@dataclass
class ReadoutResult:
    """Per-vignette outcome of one readout.

    Attributes:
        name: the readout.
        ids: vignette ids, in input order.
        answer_a: index of the option correct in ``ctx_a`` (``1 − answer_a`` in ``ctx_b``).
        choice_a: option chosen in ``ctx_a`` (0 = A, 1 = B) or None (no decision).
        choice_b: the same for ``ctx_b``.
        pair_rule: ``"did"`` (pair correct when ``DiD > 0``) or ``"both"`` (both contexts correct).
        margin_a: ``(N,)`` score of the ``ctx_a``-correct option minus the other's in ``ctx_a``, or None.
        margin_b: the same in ``ctx_b``, or None.
        texts_a: generated answers in ``ctx_a`` (generative readouts), or None.
        texts_b: the same for ``ctx_b``.
    """

    name: str
    ids: list[str]
    answer_a: np.ndarray
    choice_a: list[int | None]
    choice_b: list[int | None]
    pair_rule: PairRule
    margin_a: np.ndarray | None = None
    margin_b: np.ndarray | None = None
    texts_a: list[str] | None = None
    texts_b: list[str] | None = None

    @classmethod
    def from_margins(
        cls, name: str, vignettes: Sequence[Vignette], margin_a: Tensor, margin_b: Tensor, pair_rule: PairRule
    ) -> ReadoutResult:
        """Decisions from margins: the ``ctx_a``-correct option when the margin is positive, the other when
        negative, None on an exact tie."""
        answer_a = np.array([v.answer_a for v in vignettes])
        ma, mb = margin_a.double().numpy().reshape(-1), margin_b.double().numpy().reshape(-1)

        def choices(margin: np.ndarray) -> list[int | None]:
            return [None if m == 0 else int(a if m > 0 else 1 - a) for m, a in zip(margin, answer_a, strict=True)]

        return cls(name, [v.id for v in vignettes], answer_a, choices(ma), choices(mb), pair_rule, ma, mb)

    @property
    def did(self) -> np.ndarray | None:
        """``margin_a − margin_b``, or None for readouts without a margin."""
        return None if self.margin_a is None or self.margin_b is None else self.margin_a - self.margin_b

    @property
    def correct_a(self) -> np.ndarray:
        """Whether ``ctx_a`` was answered correctly."""
        return np.array([c == a for c, a in zip(self.choice_a, self.answer_a, strict=True)], dtype=bool)

    @property
    def correct_b(self) -> np.ndarray:
        """Whether ``ctx_b`` was answered correctly."""
        return np.array([c == 1 - a for c, a in zip(self.choice_b, self.answer_a, strict=True)], dtype=bool)

    @property
    def strict_correct(self) -> np.ndarray:
        """Both contexts answered correctly."""
        return self.correct_a & self.correct_b

    @property
    def correct(self) -> np.ndarray:
        """Pair correctness under the readout's ``pair_rule``."""
        did = self.did
        return did > 0 if self.pair_rule == "did" and did is not None else self.strict_correct

    @property
    def undecided(self) -> np.ndarray:
        """Contexts (``(N, 2)``) where the readout made no decision."""
        return np.array([[a is None, b is None] for a, b in zip(self.choice_a, self.choice_b, strict=True)])

    def summary(self) -> dict[str, Any]:
        """Pair accuracy (the readout's rule), strict and per-context accuracy, undecided rate."""
        n = len(self.ids)
        return {
            "n": n,
            "pair_rule": self.pair_rule,
            "accuracy": float(self.correct.mean()) if n else float("nan"),
            "strict_accuracy": float(self.strict_correct.mean()) if n else float("nan"),
            "context_accuracy": float(np.concatenate([self.correct_a, self.correct_b]).mean()) if n else float("nan"),
            "undecided_rate": float(self.undecided.mean()) if n else float("nan"),
        }

    def items(self) -> dict[str, list[Any]]:
        """Per-item columns, JSON-ready."""
        out: dict[str, list[Any]] = {
            "choice_a": list(self.choice_a),
            "choice_b": list(self.choice_b),
            "correct": self.correct.tolist(),
        }
        if self.margin_a is not None and self.margin_b is not None:
            out.update(margin_a=self.margin_a.tolist(), margin_b=self.margin_b.tolist(), did=self.did.tolist())
        if self.texts_a is not None and self.texts_b is not None:
            out.update(text_a=list(self.texts_a), text_b=list(self.texts_b))
        return out


@dataclass
class ReadoutSession:
    """Settings shared by the readouts of one evaluation, and the passes they can share.

    The label, semantic and constrained readouts read one scoring pass; a generation is reused by every readout
    asking for the same instruction and length (free and judge). A session caches per vignette list; start a new
    session whenever the model changes (e.g. inside each ``degrade`` block).

    Args:
        prompt: how prompts are shown to the model (``PromptFormat``; default ``auto``).
        batch_size: rows per forward pass.
        progress: show progress bars.
    """

    prompt: PromptFormat = DEFAULT_PROMPT
    batch_size: int = 16
    progress: bool = False
    _scores: dict[tuple[str, ...], OptionScores] = field(default_factory=dict, repr=False)
    _texts: dict[tuple[Any, ...], list[str]] = field(default_factory=dict, repr=False)

    def option_scores(self, model: nn.Module, tokenizer: Any, vignettes: Sequence[Vignette]) -> OptionScores:
        """The scoring pass (last layer) over ``vignettes``, computed once per session."""
        key = tuple(v.id for v in vignettes)
        if key not in self._scores:
            self._scores[key] = score_options(
                model,
                tokenizer,
                vignettes,
                layers="last",
                prompt=self.prompt,
                batch_size=self.batch_size,
                progress=self.progress,
            )
        return self._scores[key]

    def share_scores(self, scores: OptionScores) -> None:
        """Reuse scores measured elsewhere on the same model (e.g. the all-layer pass of the semantic dip)."""
        self._scores[tuple(v.id for v in scores.vignettes)] = scores.last() if scores.layers == "all" else scores

    def generations(
        self, model: nn.Module, tokenizer: Any, vignettes: Sequence[Vignette], instruction: str, max_new_tokens: int
    ) -> tuple[list[str], list[str]]:
        """Greedy answers of ``ctx_a`` and ``ctx_b`` for every vignette, computed once per session."""
        key = (tuple(v.id for v in vignettes), instruction, max_new_tokens)
        if key not in self._texts:
            texts = [v.prompt(ctx, instruction) for v in vignettes for ctx in ("a", "b")]
            self._texts[key] = greedy_generate(
                model,
                tokenizer,
                texts,
                max_new_tokens=max_new_tokens,
                prompt=self.prompt,
                batch_size=self.batch_size,
                progress=self.progress,
                description=f"generate ({max_new_tokens} tokens)",
            )
        texts = self._texts[key]
        return texts[0::2], texts[1::2]


@runtime_checkable
class Readout(Protocol):
    """Turns a model's processing of vignettes into per-context decisions (and margins where defined)."""

    name: str
    pair_rule: PairRule

    def __call__(
        self, model: nn.Module, tokenizer: Any, vignettes: Sequence[Vignette], session: ReadoutSession | None = None
    ) -> ReadoutResult:
        """Read every vignette in both contexts."""
        ...


@dataclass
class ScoreReadout:
    """A readout of the shared scoring pass: ``semantic``, ``label`` or ``constrained``."""

    name: ScoreKind
    pair_rule: PairRule = "did"

    def __call__(
        self, model: nn.Module, tokenizer: Any, vignettes: Sequence[Vignette], session: ReadoutSession | None = None
    ) -> ReadoutResult:
        """Margins at the last layer; decisions from their signs."""
        session = session or ReadoutSession()
        margin_a, margin_b = session.option_scores(model, tokenizer, vignettes).margins(self.name)
        return ReadoutResult.from_margins(self.name, vignettes, margin_a[:, -1], margin_b[:, -1], self.pair_rule)


@dataclass
class GenerativeReadout:
    """Greedy generation under ``instruction``, then rule-based extraction (``extractive`` or ``free``)."""

    name: str
    instruction: str
    mode: ExtractionMode
    max_new_tokens: int
    pair_rule: PairRule = "both"

    def __call__(
        self, model: nn.Module, tokenizer: Any, vignettes: Sequence[Vignette], session: ReadoutSession | None = None
    ) -> ReadoutResult:
        """Generate both contexts' answers and extract a decision from each."""
        session = session or ReadoutSession()
        texts_a, texts_b = session.generations(model, tokenizer, vignettes, self.instruction, self.max_new_tokens)

        def decide(texts: list[str]) -> list[int | None]:
            return [extract_choice(t, v.options, v.keys, self.mode) for t, v in zip(texts, vignettes, strict=True)]

        answer_a = np.array([v.answer_a for v in vignettes])
        ids = [v.id for v in vignettes]
        return ReadoutResult(
            self.name, ids, answer_a, decide(texts_a), decide(texts_b), self.pair_rule, texts_a=texts_a, texts_b=texts_b
        )


@dataclass
class JudgeReadout:
    """Free answers classified by a judge model as choosing A or B (the judge's " A" vs " B" logits).

    The judge sees the question, the two options and the response, never the story, so it cannot answer the
    question itself. An empty response is undecided. The judge model is separate from the model under test and
    is never degraded. Margins are the judge's logit gap (pos − neg option) and only describe its confidence.

    Args:
        judge_model: any HF causal LM.
        judge_tokenizer: its tokenizer (``" A"`` and ``" B"`` must be single tokens).
        max_new_tokens: length of the free answer being judged (shared with the ``free`` readout).
        judge_prompt: how the judge's prompt is shown to the judge.
    """

    judge_model: nn.Module
    judge_tokenizer: Any
    max_new_tokens: int = 20
    judge_prompt: PromptFormat = DEFAULT_PROMPT
    name: str = "judge"
    pair_rule: PairRule = "both"

    def __call__(
        self, model: nn.Module, tokenizer: Any, vignettes: Sequence[Vignette], session: ReadoutSession | None = None
    ) -> ReadoutResult:
        """Generate free answers with ``model``, then let the judge classify each one."""
        session = session or ReadoutSession()
        texts_a, texts_b = session.generations(model, tokenizer, vignettes, FREE_INSTRUCTION, self.max_new_tokens)
        label_ids = single_token_ids(self.judge_tokenizer, (" A", " B"))
        queries = [
            JUDGE_TEMPLATE.format(question=v.question, first=v.options[0], second=v.options[1], response=t)
            for texts in (texts_a, texts_b)
            for v, t in zip(vignettes, texts, strict=True)
        ]
        logits = next_token_logits(
            self.judge_model,
            self.judge_tokenizer,
            queries,
            label_ids,
            prompt=self.judge_prompt,
            batch_size=session.batch_size,
        ).numpy()
        n = len(vignettes)
        answer_a = np.array([v.answer_a for v in vignettes])
        gap = logits[:, 0] - logits[:, 1]  # > 0: the judge reads A
        texts = [*texts_a, *texts_b]
        choice = [None if not t.strip() or g == 0 else int(g < 0) for t, g in zip(texts, gap, strict=True)]
        sign = np.where(answer_a == 0, 1.0, -1.0)  # the ctx_a-correct option's gap
        return ReadoutResult(
            self.name,
            [v.id for v in vignettes],
            answer_a,
            choice[:n],
            choice[n:],
            self.pair_rule,
            margin_a=sign * gap[:n],
            margin_b=sign * gap[n:],
            texts_a=texts_a,
            texts_b=texts_b,
        )


@dataclass(frozen=True)
class ReadoutOptions:
    """What a readout factory may use to build its readout.

    Args:
        judge: ``(model, tokenizer)`` of the judge, needed by ``judge``.
        max_new_tokens: length of free answers (``free`` and ``judge``).
        extractive_tokens: length of extractive answers.
    """

    judge: tuple[nn.Module, Any] | None = None
    max_new_tokens: int = 20
    extractive_tokens: int = 8


ReadoutFactory = Callable[[ReadoutOptions], Readout]
_NEEDS_JUDGE = "The 'judge' readout needs a judge model: pass --judge MODEL (e.g. --judge default)."


def _judge_readout(options: ReadoutOptions) -> Readout:
    if options.judge is None:
        raise ReadoutError(_NEEDS_JUDGE)
    return JudgeReadout(options.judge[0], options.judge[1], options.max_new_tokens)


#: name -> factory ``(ReadoutOptions) -> Readout``, in ladder order; ``judge`` needs a judge model. A new readout
#: registers here and every name check, ``build_readouts`` and ``dipreg bridge --readouts`` know it.
READOUTS: dict[str, ReadoutFactory] = {
    "label": lambda options: ScoreReadout("label"),
    "semantic": lambda options: ScoreReadout("semantic"),
    "constrained": lambda options: ScoreReadout("constrained", pair_rule="both"),
    "extractive": lambda options: GenerativeReadout(
        "extractive", EXTRACTIVE_INSTRUCTION, "extractive", options.extractive_tokens
    ),
    "free": lambda options: GenerativeReadout("free", FREE_INSTRUCTION, "free", options.max_new_tokens),
    "judge": _judge_readout,
}


def build_readouts(
    names: Sequence[str],
    *,
    judge: tuple[nn.Module, Any] | None = None,
    max_new_tokens: int = 20,
    extractive_tokens: int = 8,
) -> list[Readout]:
    """Readouts by name (see :data:`READOUTS`), validated: unknown names, duplicates and ``judge`` without a
    judge model are errors that say what to pass.

    Args:
        names: readout names, in the order to run them.
        judge: ``(model, tokenizer)`` of the judge, needed by ``judge``.
        max_new_tokens: length of free answers (``free`` and ``judge``).
        extractive_tokens: length of extractive answers.
    """
    validate_readout_names(names, has_judge=judge is not None)
    if max_new_tokens < 1 or extractive_tokens < 1:
        raise ReadoutError("max_new_tokens and extractive_tokens must be >= 1.")
    options = ReadoutOptions(judge, max_new_tokens, extractive_tokens)
    return [READOUTS[name](options) for name in names]


def validate_readout_names(names: Sequence[str], *, has_judge: bool) -> None:
    """Check readout names before any model is loaded."""
    if not names:
        raise ReadoutError(f"Name at least one readout; choose from: {', '.join(READOUTS)}.")
    unknown = [n for n in names if n not in READOUTS]
    if unknown:
        raise ReadoutError(f"Unknown readout(s) {unknown}; choose from: {', '.join(READOUTS)}.")
    if len(set(names)) != len(names):
        raise ReadoutError(f"Readout names repeat in {list(names)}; name each once.")
    if "judge" in names and not has_judge:
        raise ReadoutError(_NEEDS_JUDGE)


def run_readouts(
    model: nn.Module,
    tokenizer: Any,
    vignettes: Sequence[Vignette],
    readouts: Sequence[Readout],
    session: ReadoutSession | None = None,
) -> dict[str, ReadoutResult]:
    """Every readout on the same vignettes through one session (shared passes), keyed by readout name."""
    session = session or ReadoutSession()
    return {r.name: r(model, tokenizer, vignettes, session) for r in readouts}
