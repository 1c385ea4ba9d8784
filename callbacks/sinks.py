"""Where a dip reading goes: a TensorBoard ``SummaryWriter``, a Lightning (or Fabric) logger, or a callable.

One owner of "write these scalars and figures to that destination" for :class:`~dipreg.callbacks.DipTracker` and the
Lightning :class:`~dipreg.callbacks.DipMonitor`. Loggers are recognised by what they offer, not by their class, so
this module imports neither Lightning nor any logging library:

- a Lightning/Fabric logger (it has ``log_metrics``) gets the scalars through ``log_metrics``; its figures go to
  ``experiment.add_figure`` when the experiment is a TensorBoard writer (histograms too), ``log_image`` on a
  ``WandbLogger``, ``experiment.log_figure(run_id, ...)`` on an ``MLFlowLogger`` (artifact
  ``dip/<figure>/step_<step>.png``), and otherwise, when the logger has a ``log_dir`` (``CSVLogger``), a PNG at
  ``<log_dir>/dip/<figure>/step_<step>.png``;
- a ``SummaryWriter`` (it has ``add_scalar``) gets ``add_scalar``, ``add_histogram`` and ``add_figure``;
- any other callable is called as ``sink(scalars, step)`` (figures are not passed).

It never decides whether to log (rank, cadence): the caller does.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from torch import Tensor

#: What a tracker can write to: a TensorBoard ``SummaryWriter``, a Lightning/Fabric logger, or ``fn(scalars, step)``.
Sink = Any


def check_sink(sink: Sink) -> None:
    """Raise ``TypeError`` naming ``sink`` when it is none of the kinds this module writes to."""
    if not (hasattr(sink, "log_metrics") or hasattr(sink, "add_scalar") or callable(sink)):
        raise TypeError(
            f"Cannot log dips to a {type(sink).__name__}: pass a TensorBoard SummaryWriter, a Lightning or Fabric "
            "logger (anything with log_metrics), or a function fn(scalars: dict[str, float], step: int)."
        )


def figure_file(name: str, step: int) -> str:
    """The relative PNG path of figure ``name`` (``"dip/history"``) at ``step``: ``dip/history/step_000012.png``."""
    return f"{name}/step_{step:06d}.png"


def write_scalars(sink: Sink, scalars: Mapping[str, float], step: int) -> None:
    """Send ``scalars`` at ``step`` to ``sink``."""
    if hasattr(sink, "log_metrics"):
        sink.log_metrics(dict(scalars), step=step)
    elif hasattr(sink, "add_scalar"):
        for key, value in scalars.items():
            sink.add_scalar(key, value, step)
        sink.flush()
    else:
        sink(dict(scalars), step)


def write_figures(sink: Sink, figures: Mapping[str, Figure], histograms: Mapping[str, Tensor], step: int) -> None:
    """Send ``figures`` (closed afterwards) and, where the sink takes them, ``histograms`` at ``step`` to ``sink``."""
    try:
        writer = _summary_writer(sink)
        if writer is not None:
            for name, values in histograms.items():
                writer.add_histogram(name, values, step)
            for name, fig in figures.items():
                writer.add_figure(name, fig, step, close=False)
            writer.flush()
        elif hasattr(sink, "log_image"):  # Lightning's WandbLogger
            for name, fig in figures.items():
                sink.log_image(key=name, images=[fig], step=step)
        elif hasattr(sink, "run_id") and hasattr(getattr(sink, "experiment", None), "log_figure"):  # MLFlowLogger
            for name, fig in figures.items():
                sink.experiment.log_figure(sink.run_id, fig, figure_file(name, step))
        elif getattr(sink, "log_dir", None):  # a logger with no image API (CSVLogger): PNG files beside its logs
            for name, fig in figures.items():
                path = Path(sink.log_dir) / figure_file(name, step)
                path.parent.mkdir(parents=True, exist_ok=True)
                fig.savefig(path)
    finally:
        for fig in figures.values():
            plt.close(fig)


def _summary_writer(sink: Sink) -> Any:
    """The TensorBoard writer behind ``sink`` (itself, or a logger's ``experiment``), or ``None``."""
    if hasattr(sink, "add_figure"):
        return sink
    experiment = getattr(sink, "experiment", None) if hasattr(sink, "log_metrics") else None
    return experiment if hasattr(experiment, "add_figure") else None
