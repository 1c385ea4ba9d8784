"""Minimal pairs as a LightningDataModule: each pair gives two examples, ``ctx_a → t_pos`` and ``ctx_b → t_neg``.

Batches are right-padded (every real token keeps its position id) and carry each row's answer position, its
correct and its wrong token. Contexts are rendered with the same :class:`~dipreg.prompting.PromptFormat` as the
audit. The tokenizer comes from the trained :class:`~dipreg.training.module.DipRegModule` unless one is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader

from dipreg.batching import pad_right, pad_token_id, tokenize_contexts
from dipreg.prompting import PromptFormat, PromptStyle
from dipreg.stimuli import MinimalPair, StimulusError, candidate_token_ids, load_pairs

__all__ = ["PairDataModule", "pair_examples"]

Example = tuple[list[int], int, int]


def pair_examples(
    tokenizer: Any, pairs: Sequence[MinimalPair], prompt: PromptFormat, max_positions: int | None = None
) -> list[Example]:
    """``(token ids, correct id, wrong id)`` for ``ctx_a`` then ``ctx_b`` of every pair (interleaved)."""
    encoded = tokenize_contexts(tokenizer, pairs, max_positions, prompt)
    pos, neg = candidate_token_ids(pairs, tokenizer)
    return [
        (ids, pos[i // 2], neg[i // 2]) if i % 2 == 0 else (ids, neg[i // 2], pos[i // 2])
        for i, ids in enumerate(encoded)
    ]


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, Tensor]:
    """Right-pad a list of examples into ``input_ids``, ``attention_mask``, ``last``, ``correct``, ``wrong``."""
    input_ids, mask, last = pad_right([e[0] for e in examples], pad_id, torch.device("cpu"))
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "last": last,
        "correct": torch.tensor([e[1] for e in examples]),
        "wrong": torch.tensor([e[2] for e in examples]),
    }


class PairDataModule(LightningDataModule):
    """Training and validation examples from minimal-pair sets.

    Args:
        train: a set name for :func:`dipreg.stimuli.load_pairs` (e.g. ``"comp_train"``) or a JSONL path.
        val: held-out sets, one validation loader each (logged as ``val/acc/<name>``).
        batch_size: examples (contexts) per batch; a pair gives two examples.
        prompt: ``"auto"`` | ``"raw"`` | ``"chat"`` | ``"fewshot"``, as in the audit (``fewshot`` draws the
            worked examples of a training pair from the training set, those of a validation pair from its set).
        shuffle: shuffle the training examples each epoch.
        tokenizer: the tokenizer; ``None`` takes ``trainer.lightning_module.tokenizer`` at setup.

    Example:
        >>> dm = PairDataModule(train="comp_train", val=["comp_loose", "comp_strict"], batch_size=16)  # doctest: +SKIP
        >>> trainer.fit(DipRegModule(), dm)  # doctest: +SKIP
    """

    def __init__(
        self,
        train: str = "comp_train",
        val: list[str] | None = None,
        batch_size: int = 16,
        prompt: PromptStyle = "auto",
        shuffle: bool = True,
        tokenizer: Any = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"PairDataModule: batch_size must be >= 1, got {batch_size}.")
        self.train_name = train
        self.val_names = list(val) if val is not None else ["comp_loose", "comp_strict"]
        self.batch_size = batch_size
        self.prompt = PromptFormat(prompt)
        self.shuffle = shuffle
        self.tokenizer = tokenizer
        self.train_pairs = load_pairs(train)
        self.val_pairs = {name: load_pairs(name) for name in self.val_names}
        self._train: list[Example] = []
        self._val: dict[str, list[Example]] = {}

    def setup(self, stage: str | None = None) -> None:
        """Tokenize every set once (the tokenizer is taken from the module if none was given)."""
        if self.tokenizer is None:
            module = self.trainer.lightning_module if self.trainer is not None else None
            self.tokenizer = getattr(module, "tokenizer", None)
        if self.tokenizer is None:
            raise StimulusError("PairDataModule needs a tokenizer: pass tokenizer=... or fit it with a DipRegModule.")
        if not self._train:
            self._train = pair_examples(self.tokenizer, self.train_pairs, self.prompt)
            self._val = {name: pair_examples(self.tokenizer, p, self.prompt) for name, p in self.val_pairs.items()}

    def _loader(self, examples: list[Example], shuffle: bool) -> DataLoader:
        pad_id = pad_token_id(self.tokenizer)
        return DataLoader(
            examples,  # type: ignore[arg-type]
            batch_size=self.batch_size,
            shuffle=shuffle,
            collate_fn=lambda batch: collate(batch, pad_id),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled (unless ``shuffle=False``) training batches."""
        return self._loader(self._train, self.shuffle)

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per held-out set, in ``val`` order."""
        return [self._loader(self._val[name], False) for name in self.val_names]
