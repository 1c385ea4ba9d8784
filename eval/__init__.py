"""Evaluation (installed as dipreg.eval): degradations, statistics, readouts, the arms experiment and the ladder.

- :mod:`~dipreg.eval.degradation`: ``degrade(model, op, **params)`` applies one operator to a live model and
  restores it bit-exactly on exit (operators, weight layouts, quantizers, the restore ledger, `dipreg degrade`);
- :mod:`~dipreg.eval.stats`: flip statistics (tertiles, Mann–Whitney, Spearman, McNemar, paired t);
- :mod:`~dipreg.eval.readouts`: natural-language vignette readouts, prompt interventions and `dipreg bridge`;
- :mod:`~dipreg.eval.arms`: `dipreg arms` (plan, train, evaluate, stats, report, figures);
- :mod:`~dipreg.eval.ladder`: `dipreg ladder`, the base ↔ instruct causal-dip ladder.
"""

from dipreg.eval.degradation import (
    OPERATORS,
    DegradeError,
    DegradeReport,
    UnsupportedOperatorError,
    degrade,
    parse_ops,
    state_checksum,
)

# The public degradation API, re-exported under dipreg.eval (its documented home).
__all__ = [
    "OPERATORS",
    "DegradeError",
    "DegradeReport",
    "UnsupportedOperatorError",
    "degrade",
    "parse_ops",
    "state_checksum",
]
