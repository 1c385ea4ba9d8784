"""The tuned lens: one learned affine translator per layer, applied to ``h_ℓ`` before the final norm and the two
unembedding rows; saved and loaded as a small file next to the model id.

This module holds the lens, its file format and where files live; training is in :mod:`dipreg.lenses.tuned_training`.
It never changes the model.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from dipreg.adapter import ModelAdapter
from dipreg.models import cache_dir

#: File name of a tuned lens inside its folder.
TUNED_LENS_FILE = "tuned-lens.pt"
#: Built-in corpus names (anything else is a text file).
CORPORA: tuple[str, ...] = ("in-domain", "out-of-domain")
#: Corpus of the tuned lens that ``lens="tuned"`` loads when no path is given (the paper's control, §3.3).
DEFAULT_CORPUS = "out-of-domain"
#: Metadata fields every tuned-lens file carries (written by :meth:`TunedLens.save`).
REQUIRED_META: tuple[str, ...] = ("num_layers", "hidden_size")

_RETRAIN = "Retrain it with `dipreg tuned-lens train` or pass the tuned-lens.pt that training wrote."


class TunedLensFileError(ValueError):
    """A tuned-lens file cannot be used; the one-line message names the file and what is wrong with it."""


def _examples(names: list[str], limit: int = 3) -> str:
    """The first ``limit`` names, comma-separated, escaped so that the message stays on one line."""
    shown = ", ".join(repr(name)[1:-1] for name in names[:limit])
    return shown + (", ..." if len(names) > limit else "")


def _load_error_reason(err: Exception) -> str:
    """Why ``torch.load`` refused a zip archive, in a few words and without PyTorch's advice to disable
    ``weights_only`` (a file that needs that is exactly the one dipreg must not execute)."""
    text = str(err)
    if "Weights only load failed" in text or "weights_only" in text:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        what = f" ({found.group(1)})" if found else ""
        return (
            f"it holds Python objects other than tensors and plain containers{what}, a pickle payload that could run "
            "code; dipreg does not load such files"
        )
    first = (text.strip().splitlines() or [type(err).__name__])[0]
    first = first.split(". ")[0].rstrip(".")
    return f"damaged archive ({first[:120]})"


def _read_lens_blob(path: Path) -> tuple[dict[str, Any], Mapping[str, Any]]:
    """Read ``path`` with ``torch.load(weights_only=True)`` and check the format and the metadata fields:
    returns ``(meta, state_dict)``; anything else is a :class:`TunedLensFileError` naming the file."""

    def fail(what: str) -> TunedLensFileError:
        return TunedLensFileError(f"{path} is not a tuned-lens file dipreg can use: {what}. {_RETRAIN}")

    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as err:
        raise fail(f"cannot be read ({err.strerror or err})") from None
    if not zipfile.is_zipfile(path):
        if magic == b"PK\x03\x04":
            raise fail("format: a truncated or damaged zip archive (the file was cut short or corrupted)")
        raise fail("format: not a torch.save zip archive (wrong file, or damaged)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any failure to read the archive is reported as one line (its cause is chained)
        raise fail(f"format: {_load_error_reason(err)}") from None
    if not isinstance(blob, Mapping) or not {"meta", "state_dict"} <= set(blob):
        keys = sorted(map(str, blob)) if isinstance(blob, Mapping) else type(blob).__name__
        raise fail(f"format: expected a dict with 'meta' and 'state_dict', got {keys} (not written by dipreg)")
    meta, state = blob["meta"], blob["state_dict"]
    if not isinstance(meta, Mapping):
        raise fail(f"metadata: 'meta' must be a dict, got {type(meta).__name__}")
    if not isinstance(state, Mapping):
        raise fail(f"keys: 'state_dict' must be a dict of tensors, got {type(state).__name__}")
    for key in REQUIRED_META:
        if key not in meta:
            raise fail(f"metadata field {key!r} is missing (has: {_examples(sorted(map(str, meta)), 8) or 'nothing'})")
        value = meta[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise fail(f"metadata field {key!r} must be a positive integer, got {value!r}")
    return dict(meta), state


def _check_lens_state(path: Path, num_layers: int, hidden_size: int, state: Mapping[str, Any]) -> None:
    """Check that ``state`` holds exactly the translators of a ``num_layers``-layer, width-``hidden_size`` lens:
    the layer count, every key, each shape and dtype, finite values. Errors name the file and what differs."""

    def fail(what: str) -> TunedLensFileError:
        return TunedLensFileError(f"{path} is not a tuned-lens file dipreg can use: {what}. {_RETRAIN}")

    expected = {f"translators.{i}.{part}" for i in range(num_layers - 1) for part in ("weight", "bias")}
    present = {str(key) for key in state}
    held = {int(m.group(1)) for key in present if (m := re.fullmatch(r"translators\.(\d+)\.(weight|bias)", key))}
    if held and held != set(range(num_layers - 1)):
        raise fail(
            f"layer count: the metadata says {num_layers} layers ({num_layers - 1} translators) but the weights "
            f"hold translators {min(held)}..{max(held)} ({len(held)})"
        )
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing or unexpected:
        raise fail(
            f"keys: {len(missing)} missing ({_examples(missing) or '-'}), {len(unexpected)} unexpected "
            f"({_examples(unexpected) or '-'})"
        )
    for key in sorted(expected):
        tensor = state[key]
        want = (hidden_size, hidden_size) if key.endswith("weight") else (hidden_size,)
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            kind = f"{tensor.dtype} tensor" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise fail(f"{key} must be a floating-point tensor, got a {kind}")
        if tuple(tensor.shape) != want:
            raise fail(
                f"width: the metadata says width {hidden_size} but {key} has shape {tuple(tensor.shape)} "
                f"(expected {want})"
            )
        if not bool(torch.isfinite(tensor).all()):
            raise fail(f"{key} holds NaN or infinite values")


def model_id(model: PreTrainedModel) -> str:
    """A file-system-safe id of a model: the folder name of a local checkpoint, else the HF name with ``/`` → ``--``
    (the model type for a model built from a config)."""
    name = str(getattr(model.config, "name_or_path", "") or "")
    if not name:
        return str(model.config.model_type)
    path = Path(name)
    return path.name if path.exists() else name.replace("/", "--")


def default_tuned_lens_dir(model: PreTrainedModel, corpus: str) -> Path:
    """``cache_dir()/tuned-lens/<model id>/<corpus>``: where ``dipreg tuned-lens train`` writes without ``--out``."""
    return cache_dir() / "tuned-lens" / model_id(model) / corpus


class TunedLens(nn.Module):
    """Per-layer affine translators ``T_ℓ(h) = h + A_ℓ h + b_ℓ`` (``A_ℓ = 0``, ``b_ℓ = 0`` at init: the identity,
    i.e. the logit lens), for layers ``1..L−1``; layer ``L`` is read as is, so ``ℓ = L`` stays the model's output.

    Args:
        num_layers: ``L`` of the model.
        hidden_size: ``D`` of the model.
        meta: provenance stored with the weights (model id, corpus, training settings).

    Example:
        >>> lens = TunedLens(adapter.num_layers, hidden_size=576)  # doctest: +SKIP
        >>> lens.save("runs/tl/tuned-lens.pt"); TunedLens.load("runs/tl/tuned-lens.pt")  # doctest: +SKIP
        >>> dipreg.trajectories(model, tok, pairs, lens="tuned", path="runs/tl")  # doctest: +SKIP
    """

    name = "tuned"

    def __init__(self, num_layers: int, hidden_size: int, meta: dict[str, Any] | None = None) -> None:
        super().__init__()
        if num_layers < 1 or hidden_size < 1:
            raise ValueError(f"num_layers and hidden_size must be >= 1, got {num_layers} and {hidden_size}.")
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.meta: dict[str, Any] = dict(meta or {})
        self.path: Path | None = None  # the file it was loaded from, if any
        self.translators = nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in range(num_layers - 1))
        for translator in self.translators:
            nn.init.zeros_(translator.weight)
            nn.init.zeros_(translator.bias)

    def forward(self, residuals: Tensor) -> Tensor:
        """Translate ``(L, ..., D)`` residuals layer by layer (the last layer unchanged)."""
        self.check_shape(residuals.shape[0], residuals.shape[-1])
        h = residuals.to(self.translators[0].weight.dtype) if self.translators else residuals
        translated = [h[i] + translator(h[i]) for i, translator in enumerate(self.translators)]
        return torch.stack([*translated, h[-1]]).to(residuals.dtype)

    def check_shape(self, num_layers: int, hidden_size: int) -> None:
        """A clear error when a model or residual tensor does not match this lens."""
        if (num_layers, hidden_size) != (self.num_layers, self.hidden_size):
            raise ValueError(
                f"This tuned lens was trained for {self.num_layers} layers of width {self.hidden_size} "
                f"(model {self.meta.get('model_id', '?')!r}), but got {num_layers} layers of width {hidden_size}. "
                "Train one for this model with `dipreg tuned-lens train --model ...`."
            )

    @torch.no_grad()
    def margins(self, adapter: ModelAdapter, residuals: Tensor, pos_ids: Tensor, neg_ids: Tensor) -> Tensor:
        """``U[t_pos]·N(T_ℓ(h_ℓ)) − U[t_neg]·N(T_ℓ(h_ℓ))`` for every layer ``ℓ``: ``(L, N)``."""
        return adapter.margin(self(residuals), pos_ids, neg_ids)

    def save(self, path: str | Path) -> Path:
        """Write the translators and the metadata to ``path`` (a ``.pt`` file; parent folders are created)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {**self.meta, "num_layers": self.num_layers, "hidden_size": self.hidden_size}
        torch.save({"meta": meta, "state_dict": self.state_dict()}, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> TunedLens:
        """Read a file written by :meth:`save` (a folder means the ``tuned-lens.pt`` inside it).

        The file is read with ``torch.load(weights_only=True)`` (never executing a pickle) and checked fully:
        format, the metadata fields :data:`REQUIRED_META`, the layer count, every key, the width of every tensor
        and finite values. Raises :class:`FileNotFoundError` when there is no file and :class:`TunedLensFileError`
        (a ``ValueError``) naming the file and the problem otherwise.
        """
        path = resolve_lens_path(path)
        meta, state = _read_lens_blob(path)
        num_layers, hidden_size = meta["num_layers"], meta["hidden_size"]
        _check_lens_state(path, num_layers, hidden_size, state)
        lens = cls(num_layers, hidden_size, meta)
        lens.load_state_dict(dict(state))
        lens.path = path
        return lens.eval()


def resolve_lens_path(path: str | Path) -> Path:
    """The tuned-lens file ``path`` names (a folder means its ``tuned-lens.pt``); ``FileNotFoundError`` if absent."""
    path = Path(path)
    if path.is_dir():
        path = path / TUNED_LENS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"No tuned lens at {path}. Train one with `dipreg tuned-lens train --corpus out-of-domain` "
            "(or in-domain, or a text FILE) and pass its --out folder."
        )
    return path


def tuned_lens_options(spec: str | None) -> dict[str, str]:
    """``lens="tuned"`` options of a ``--tuned-lens`` value: a corpus name (its default location) or a path."""
    if spec is None:
        return {}
    return {"corpus": spec} if spec in CORPORA else {"path": spec}


def load_tuned_lens(adapter: ModelAdapter, path: str | Path | None = None, corpus: str = DEFAULT_CORPUS) -> TunedLens:
    """The tuned lens of ``adapter``'s model: from ``path`` (file or folder), else from the default location of
    ``corpus`` (see :func:`default_tuned_lens_dir`). Errors say how to train one and name any shape mismatch."""
    if path is None:
        folder = default_tuned_lens_dir(adapter.causal_lm, corpus)
        if not (folder / TUNED_LENS_FILE).is_file():
            raise FileNotFoundError(
                f"No {corpus} tuned lens for model {model_id(adapter.causal_lm)!r} at {folder / TUNED_LENS_FILE}. "
                f"Train one with `dipreg tuned-lens train --corpus {corpus}` (add --model for a non-default model), "
                "or pass the path of a trained lens (--tuned-lens PATH)."
            )
        path = folder
    lens = TunedLens.load(path)
    try:
        lens.check_shape(adapter.num_layers, int(adapter.lm_head.weight.shape[-1]))
    except ValueError as err:
        raise TunedLensFileError(f"{lens.path}: {err}") from None
    return lens.to(adapter.device)
