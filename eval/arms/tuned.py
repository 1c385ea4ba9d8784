"""The tuned lens a `dipreg arms` run's ``dip_reg_tuned`` arms read: trained once per run folder, then reused.

A run folder holds one base model (``arms_config.json`` refuses another), so one lens per folder is one lens per
model. It is trained with the `dipreg tuned-lens train` machinery (:func:`~dipreg.lenses.tuned_training.
run_tuned_lens_train`) on the default corpus (out-of-domain text sampled from the base model, seeded) into
``<out>/tuned-lens/`` (``tuned-lens.pt``, ``train.json``, ``corpus.txt``); a later or resumed run finds
``tuned-lens.pt`` there, checks it loads, and skips the training.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from dipreg.lenses.tuned import DEFAULT_CORPUS, TUNED_LENS_FILE, TunedLens, TunedLensFileError
from dipreg.lenses.tuned_training import TrainSettings, run_tuned_lens_train

__all__ = ["TUNED_LENS_DIR", "ensure_tuned_lens", "tuned_lens_settings"]

#: The folder of the run's tuned lens inside the `dipreg arms` output folder.
TUNED_LENS_DIR = "tuned-lens"


def tuned_lens_settings(quick: bool) -> TrainSettings:
    """`dipreg tuned-lens train`'s defaults; a ``--quick`` run trains a small lens (few steps and texts)."""
    return TrainSettings(steps=20, max_sequences=16) if quick else TrainSettings()


def ensure_tuned_lens(
    out_dir: Path, model_name: str | None, *, quick: bool = False, console: Console | None = None
) -> tuple[Path, float]:
    """The run's tuned lens, ``<out_dir>/tuned-lens/tuned-lens.pt``, trained now when absent or unreadable;
    returns its path and the seconds spent training it (0 when it was reused)."""
    folder = out_dir / TUNED_LENS_DIR
    path = folder / TUNED_LENS_FILE
    if path.is_file():
        try:
            TunedLens.load(path)
            return path, 0.0
        except TunedLensFileError as err:
            (console or Console()).print(f"note: {err}; training the run's tuned lens again.")
    start = time.perf_counter()
    run_tuned_lens_train(model_name, DEFAULT_CORPUS, folder, tuned_lens_settings(quick), console=console)
    return path, time.perf_counter() - start
