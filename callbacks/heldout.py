"""`HeldOutEval`: held-out accuracy and logit-lens dip of the base model and of the trained model, after fit.

"Before" is the same model with the LoRA adapter disabled (the untrained base, whatever was resumed); "after"
is the trained model. Results go to ``<log dir>/heldout.json``, the logger and the console (rank zero only).
The callback measures; it never changes the model (``trajectories`` restores train/eval mode).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only
from rich.console import Console
from rich.table import Table

from dipreg.artifacts import write_json
from dipreg.metrics import DEFAULT_WINDOW
from dipreg.stimuli import load_pairs
from dipreg.trajectory import trajectories
from dipreg.validation import validate_window

__all__ = ["HeldOutEval"]


class HeldOutEval(Callback):
    """Measure accuracy and mean max-wrong-dip on held-out sets before (adapter off) and after training.

    Args:
        sets: pair-set names or JSONL paths (default: the loose and strict compositional splits).
        batch_size: contexts per forward pass.
        window: dip window (default: the audit's ``(0.25, 0.90)``).
        prompt: ``None`` uses the datamodule's prompt format (else ``"auto"``).

    Example:
        >>> trainer = lightning.Trainer(callbacks=[HeldOutEval(["comp_loose", "strict240"])])  # doctest: +SKIP
    """

    def __init__(
        self,
        sets: list[str] | None = None,
        batch_size: int = 32,
        window: tuple[float, float] = DEFAULT_WINDOW,
        prompt: str | None = None,
    ) -> None:
        self.sets = list(sets) if sets is not None else ["comp_loose", "comp_strict"]
        self.pairs = {name: load_pairs(name) for name in self.sets}
        self.batch_size = batch_size
        self.window = validate_window(window, "HeldOutEval window")
        self.prompt = prompt
        self.results: dict[str, Any] = {}

    @property
    def state_key(self) -> str:
        return f"HeldOutEval{self.sets}"

    def _measure(self, pl_module: LightningModule, prompt: Any) -> dict[str, dict[str, float]]:
        out = {}
        for name, pairs in self.pairs.items():
            traj = trajectories(
                pl_module.model,
                pl_module.tokenizer,
                pairs,
                batch_size=self.batch_size,
                window=self.window,
                prompt=prompt,
            )
            summary = traj.summary()["all"]
            out[name] = {k: summary[k] for k in ("n", "accuracy", "mean_max_wrong_dip", "mean_commit_layer_frac")}
        return out

    @rank_zero_only
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Measure both states and write ``heldout.json``."""
        prompt = self.prompt or getattr(getattr(trainer, "datamodule", None), "prompt", "auto")
        with pl_module.model.disable_adapter():
            before = self._measure(pl_module, prompt)
        after = self._measure(pl_module, prompt)
        self.results = {"before": before, "after": after, "window": list(self.window), "step": trainer.global_step}
        root = Path(trainer.log_dir or trainer.default_root_dir)
        write_json(root / "heldout.json", self.results)
        if trainer.logger is not None:
            metrics = {
                f"heldout/{when}/{key}/{name}": value
                for when, res in (("before", before), ("after", after))
                for name, row in res.items()
                for key, value in row.items()
                if key in ("accuracy", "mean_max_wrong_dip")
            }
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
        table = Table(title=f"held-out sets, before → after training ({trainer.global_step} steps)")
        for column in ("set", "n", "accuracy", "mean max wrong dip", "commit depth"):
            table.add_column(column)
        for name in self.sets:
            b, a = before[name], after[name]
            table.add_row(
                name,
                str(a["n"]),
                f"{b['accuracy']:.3f} → {a['accuracy']:.3f}",
                f"{b['mean_max_wrong_dip']:.3f} → {a['mean_max_wrong_dip']:.3f}",
                f"{b['mean_commit_layer_frac']:.3f} → {a['mean_commit_layer_frac']:.3f}",
            )
        Console().print(table)
