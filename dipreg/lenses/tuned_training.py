"""Training a tuned lens: build a corpus, cache its hidden states once, fit the translators by KL to the final layer.

Corpora: ``in-domain`` (the contexts of the built-in stimuli, rendered as the audit renders them),
``out-of-domain`` (English text sampled from the model itself from :data:`GENERIC_PROMPTS` with a fixed seed)
or a text file (one document per line). The model is only read (eval mode, no grad); only the translators learn.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from torch import Tensor

from dipreg.adapter import ModelAdapter, eval_mode
from dipreg.artifacts import prepare_out_dir, write_json
from dipreg.batching import pad_right, pad_token_id
from dipreg.lenses.tuned import CORPORA, DEFAULT_CORPUS, TUNED_LENS_FILE, TunedLens, default_tuned_lens_dir, model_id
from dipreg.models import load_model
from dipreg.prompting import DEFAULT_AUDIT_PROMPT, PromptFormat
from dipreg.stimuli import load_pairs
from dipreg.validation import validate_count, validate_number

#: Generic openings the out-of-domain corpus is sampled from (raw text, no chat template).
GENERIC_PROMPTS: tuple[str, ...] = (
    "The history of the city begins",
    "In the morning, the market",
    "Scientists have recently discovered",
    "The recipe calls for",
    "When I was a child,",
    "The weather in the mountains",
    "A good book should",
    "The train left the station",
    "Music has always been",
    "The first step in learning a language is",
    "On the other side of the river",
    "The company announced that",
    "Our garden is full of",
    "The museum opened a new exhibition",
    "Computers work by",
    "Every summer, my family",
)


@dataclass(frozen=True)
class TrainSettings:
    """Settings of :func:`train_tuned_lens` (recorded in the lens metadata).

    Args:
        steps: optimizer steps.
        lr: Adam learning rate.
        batch_tokens: training positions per step (all layers at once).
        max_sequences: sequences drawn (seeded) from the corpus.
        positions_per_sequence: the last K tokens of each sequence are training positions.
        vocab_top_k: the KL runs over the union of every position's top-k final-layer tokens (both
            distributions renormalised on it), a CPU-sized stand-in for the full vocabulary; 0 = full vocabulary.
        seed: seeds sampling, the corpus subset and the batches.
    """

    steps: int = 300
    lr: float = 1e-3
    batch_tokens: int = 64
    max_sequences: int = 256
    positions_per_sequence: int = 8
    vocab_top_k: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_tokens", "max_sequences", "positions_per_sequence", "vocab_top_k", "seed"):
            flag = _FLAGS.get(name)
            minimum = 0 if name in ("vocab_top_k", "seed") else 1
            validate_count(getattr(self, name), f"{name} ({flag})" if flag else name, minimum)
        validate_number(self.lr, "lr (--lr)", 0.0, low_open=True)


#: The `dipreg tuned-lens train` flag of each :class:`TrainSettings` field (the ones the CLI exposes).
_FLAGS = {
    "steps": "--steps",
    "lr": "--lr",
    "max_sequences": "--max-sequences",
    "positions_per_sequence": "--positions",
    "vocab_top_k": "--vocab-top-k",
    "seed": "--seed",
}


#: The built-in pair sets whose contexts make the in-domain corpus.
IN_DOMAIN_SETS: tuple[str, ...] = ("core", "role_binding")


def in_domain_texts(tokenizer: Any, prompt: str = DEFAULT_AUDIT_PROMPT) -> list[str]:
    """Both contexts of every pair of :data:`IN_DOMAIN_SETS`, each set rendered as ``dipreg audit --pairs SET
    --prompt PROMPT`` renders it (``fewshot`` draws its worked examples from the same set)."""
    style = PromptFormat(prompt)  # type: ignore[arg-type]
    return [text for name in IN_DOMAIN_SETS for text in style.render_pairs(load_pairs(name), tokenizer)]


@torch.no_grad()
def sample_out_of_domain_texts(
    model: Any, tokenizer: Any, num_texts: int, *, new_tokens: int = 40, seed: int = 0
) -> list[str]:
    """``num_texts`` continuations sampled (temperature 1, seeded) from the model, round-robin over
    :data:`GENERIC_PROMPTS`; each text is its prompt plus the continuation."""
    torch.manual_seed(seed)
    per_prompt = -(-num_texts // len(GENERIC_PROMPTS))
    texts: list[str] = []
    device = ModelAdapter(model).input_device  # not model.device: under a device map that may be any block's
    for prompt in GENERIC_PROMPTS:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=device)
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            max_new_tokens=new_tokens,
            num_return_sequences=per_prompt,
            pad_token_id=tokenizer.pad_token_id,
        )
        texts.extend(tokenizer.batch_decode(out, skip_special_tokens=True))
    return texts[:num_texts]


def file_texts(path: str | Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file (one document per line); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Corpus file {path} not found; pass in-domain, out-of-domain or a text FILE.")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"Corpus file {path}: not UTF-8 text (byte {err.start}: 0x{data[err.start]:02x}); save it as UTF-8."
        ) from err
    texts = [line.strip() for line in text.splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"Corpus file {path} has no non-empty line; put one document per line.")
    return texts


def corpus_texts(corpus: str, model: Any, tokenizer: Any, settings: TrainSettings) -> tuple[list[str], bool]:
    """The texts of ``corpus`` (in-domain | out-of-domain | FILE), at most ``settings.max_sequences`` (seeded),
    and whether they are tokenized with the tokenizer's special tokens (not when a chat template holds them)."""
    add_special_tokens = True
    if corpus == "in-domain":
        texts = in_domain_texts(tokenizer)
        add_special_tokens = PromptFormat(DEFAULT_AUDIT_PROMPT).add_special_tokens(tokenizer)
    elif corpus == "out-of-domain":
        texts = sample_out_of_domain_texts(model, tokenizer, settings.max_sequences, seed=settings.seed)
    else:
        texts = file_texts(corpus)
    if len(texts) > settings.max_sequences:
        texts = random.Random(settings.seed).sample(texts, settings.max_sequences)
    return texts, add_special_tokens


@torch.no_grad()
def collect_hidden_states(
    adapter: ModelAdapter,
    tokenizer: Any,
    texts: list[str],
    positions_per_sequence: int,
    *,
    add_special_tokens: bool = True,
    batch_size: int = 16,
) -> Tensor:
    """Residuals after every block at the last ``positions_per_sequence`` tokens of each text: ``(L, T, D)``."""
    encoded = [ids for ids in tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"] if ids]
    limit = getattr(adapter.causal_lm.config, "max_position_embeddings", None)
    if limit:
        encoded = [ids[-limit:] for ids in encoded]
    pad_id = pad_token_id(tokenizer)
    device = adapter.input_device  # token ids go to the embedding's device (under a device map not the head's)
    offsets = torch.arange(positions_per_sequence, device=device)
    chunks = []
    for start in range(0, len(encoded), batch_size):
        input_ids, mask, last = pad_right(encoded[start : start + batch_size], pad_id, device)
        positions = last[:, None] - offsets  # (B, K), may run below 0 for short texts
        residuals = adapter.residuals(input_ids, mask, positions.clamp(min=0))  # (L, B, K, D)
        chunks.append(residuals[:, positions >= 0])
    if not chunks:
        raise ValueError("The corpus has no text with at least one token.")
    return torch.cat(chunks, dim=1)


def _log_probs(adapter: ModelAdapter, residual: Tensor, vocab: Tensor | None) -> Tensor:
    """Log-softmax over ``vocab`` (all tokens when None) of the logits of raw residuals ``(..., D)``."""
    weight = adapter.lm_head.weight if vocab is None else adapter.lm_head.weight[vocab]
    bias = getattr(adapter.lm_head, "bias", None)
    if bias is not None and vocab is not None:
        bias = bias[vocab]
    return adapter.apply_softcap(F.linear(adapter.final_norm(residual), weight, bias)).log_softmax(-1)


@torch.no_grad()
def training_vocabulary(adapter: ModelAdapter, final: Tensor, top_k: int, chunk: int = 256) -> Tensor | None:
    """The union of every position's top-``top_k`` final-layer tokens (None = the full vocabulary)."""
    if top_k == 0:
        return None
    keep = torch.zeros(adapter.lm_head.weight.shape[0], dtype=torch.bool, device=final.device)
    for start in range(0, final.shape[0], chunk):
        keep[_log_probs(adapter, final[start : start + chunk], None).topk(top_k, dim=-1).indices.flatten()] = True
    return keep.nonzero().squeeze(-1)


def lens_kl(lens: TunedLens, adapter: ModelAdapter, hidden: Tensor, vocab: Tensor | None) -> Tensor:
    """Mean over layers ``1..L−1`` and positions of ``KL(final ‖ lens_ℓ)`` for hidden states ``(L, B, D)``."""
    target = _log_probs(adapter, hidden[-1], vocab).detach()
    predicted = _log_probs(adapter, lens(hidden)[:-1], vocab)
    return F.kl_div(predicted, target.expand_as(predicted), log_target=True, reduction="none").sum(-1).mean()


def train_tuned_lens(
    adapter: ModelAdapter,
    hidden: Tensor,
    settings: TrainSettings,
    *,
    meta: dict[str, Any] | None = None,
    progress: bool = False,
) -> tuple[TunedLens, list[float]]:
    """Fit identity-initialised translators to cached hidden states ``(L, T, D)``.

    A plain loop, not a Lightning Trainer: a few hundred Adam steps on tensors already in memory need no
    checkpointing, logging or distribution. Returns the lens (eval mode) and the loss of every step.
    """
    num_layers, num_tokens, dim = hidden.shape
    lens = TunedLens(num_layers, dim, meta).to(adapter.device)
    vocab = training_vocabulary(adapter, hidden[-1], settings.vocab_top_k)
    lens.meta["vocab_size_used"] = int(adapter.lm_head.weight.shape[0] if vocab is None else vocab.numel())
    frozen = [p for p in adapter.causal_lm.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    optimizer = torch.optim.Adam(lens.parameters(), lr=settings.lr)
    generator = torch.Generator().manual_seed(settings.seed)
    losses: list[float] = []
    columns = (
        TextColumn("tuned lens"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} loss {task.fields[loss]}"),
    )
    try:
        with Progress(*columns, TimeRemainingColumn(), disable=not progress, transient=True) as bar:
            task = bar.add_task("train", total=settings.steps, loss="-")
            for _ in range(settings.steps):
                idx = torch.randint(num_tokens, (min(settings.batch_tokens, num_tokens),), generator=generator)
                loss = lens_kl(lens, adapter, hidden[:, idx.to(hidden.device)], vocab)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                bar.update(task, advance=1, loss=f"{losses[-1]:.4f}")
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return lens.eval(), losses


def build_tuned_lens(
    model: Any, tokenizer: Any, corpus: str, settings: TrainSettings, *, progress: bool = False
) -> tuple[TunedLens, list[float], list[str]]:
    """Corpus → cached hidden states → trained lens, with metadata. Returns the lens, the losses and the texts."""
    adapter = ModelAdapter(model)
    with eval_mode(adapter.causal_lm):
        texts, add_special_tokens = corpus_texts(corpus, adapter.causal_lm, tokenizer, settings)
        hidden = collect_hidden_states(
            adapter, tokenizer, texts, settings.positions_per_sequence, add_special_tokens=add_special_tokens
        )
        meta = {
            "model_id": model_id(adapter.causal_lm),
            "corpus": corpus if corpus in CORPORA else str(Path(corpus).resolve()),
            "num_sequences": len(texts),
            "num_positions": int(hidden.shape[1]),
            **vars(settings),
        }
        lens, losses = train_tuned_lens(adapter, hidden, settings, meta=meta, progress=progress)
    return lens, losses, texts


def run_tuned_lens_train(
    model_name: str | None = None,
    corpus: str = DEFAULT_CORPUS,
    out: str | Path | None = None,
    settings: TrainSettings | None = None,
    *,
    console: Console | None = None,
) -> dict[str, Any]:
    """`dipreg tuned-lens train`: train, write ``tuned-lens.pt``, ``train.json`` and ``corpus.txt`` into ``out``
    (default: :func:`~dipreg.lenses.tuned.default_tuned_lens_dir`), print a table, return the JSON payload.
    ``settings=None`` means :class:`TrainSettings` with its defaults (checked when built). A corpus that is neither
    a known name nor a readable, non-empty UTF-8 file raises before the model loads and before ``out`` is made."""
    console = console or Console()
    settings = settings if settings is not None else TrainSettings()
    if corpus not in CORPORA:
        if not Path(corpus).is_file():
            raise FileNotFoundError(f"--corpus {corpus!r} is neither one of {', '.join(CORPORA)} nor an existing file.")
        file_texts(corpus)  # an unreadable or empty corpus file fails here, before the model loads
    model, tokenizer = load_model(model_name)
    name = corpus if corpus in CORPORA else Path(corpus).stem
    out_dir = prepare_out_dir(out if out is not None else default_tuned_lens_dir(model, name))
    lens, losses, texts = build_tuned_lens(model, tokenizer, corpus, settings, progress=True)
    path = lens.save(out_dir / TUNED_LENS_FILE)
    (out_dir / "corpus.txt").write_text("".join(text.replace("\n", " ") + "\n" for text in texts), encoding="utf-8")
    window = min(10, len(losses))
    payload = {
        "path": str(path),
        "meta": lens.meta,
        "loss_first": sum(losses[:window]) / window,
        "loss_last": sum(losses[-window:]) / window,
        "losses": losses,
    }
    write_json(out_dir / "train.json", payload)
    table = Table(title=f"dipreg tuned-lens train — {lens.meta['model_id']} on {name}")
    table.add_column("field")
    table.add_column("value", justify="right")
    for key in ("num_sequences", "num_positions", "vocab_size_used", "steps", "lr"):
        table.add_row(key, str(lens.meta[key]))
    table.add_row(f"KL, mean of first {window} steps", f"{payload['loss_first']:.4f}")
    table.add_row(f"KL, mean of last {window} steps", f"{payload['loss_last']:.4f}")
    console.print(table)
    console.print(f"wrote {path}, {out_dir / 'train.json'} and {out_dir / 'corpus.txt'}")
    return payload
