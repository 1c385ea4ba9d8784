"""The tuned lens: one learned affine translator per layer, applied to ``h_ℓ`` before the final norm and the two
unembedding rows; saved and loaded as a small file next to the model id.

This module holds the lens, its file format and where files live; training is in :mod:`dipreg.lenses.tuned_training`.
It never changes the model.
"""

from __future__ import annotations

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
        """Read a file written by :meth:`save` (a folder means the ``tuned-lens.pt`` inside it)."""
        path = Path(path)
        if path.is_dir():
            path = path / TUNED_LENS_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"No tuned lens at {path}. Train one with `dipreg tuned-lens train --corpus out-of-domain` "
                "(or in-domain, or a text FILE) and pass its --out folder."
            )
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or not {"meta", "state_dict"} <= set(blob):
            raise ValueError(f"{path} is not a tuned-lens file written by dipreg (no 'meta'/'state_dict').")
        meta = blob["meta"]
        lens = cls(int(meta["num_layers"]), int(meta["hidden_size"]), meta)
        lens.load_state_dict(blob["state_dict"])
        return lens.eval()


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
    lens.check_shape(adapter.num_layers, int(adapter.lm_head.weight.shape[-1]))
    return lens.to(adapter.device)
