"""`dipreg arms`: train the recipe arms × seeds with the dip monitor, evaluate them under compression, report.

- :mod:`~dipreg.eval.arms.plan`: the arms (recipe + λ), seeds and size settings;
- :mod:`~dipreg.eval.arms.train`: stage 1, one arm × seed through the same recipe path as `dipreg fit`;
- :mod:`~dipreg.eval.arms.evaluate`: stage 2, one model under every condition, causal re-measurement, NLL;
- :mod:`~dipreg.eval.arms.stats`, :mod:`~dipreg.eval.arms.report`, :mod:`~dipreg.eval.arms.figures`: stage 3;
- :mod:`~dipreg.eval.arms.runner`: :func:`run_arms`, the three stages in order, resumable.

Importing this package does not import Lightning; :func:`run_arms` does when it runs.
"""

from __future__ import annotations

from typing import Any

__all__ = ["run_arms"]


def run_arms(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """:func:`dipreg.eval.arms.runner.run_arms` (imported on first call: it imports Lightning)."""
    from dipreg.eval.arms.runner import run_arms as run

    return run(*args, **kwargs)
