"""Degradation operators, statistics and reports (installed as dipreg.eval).

``degrade(model, op, **params)`` applies one operator to a live model and restores it bit-exactly on exit;
:mod:`dipreg.eval.stats` holds the flip statistics; ``dipreg degrade`` (``degrade_report``) runs them end to end.
:mod:`dipreg.eval.readouts` reads natural-language vignettes (label, semantic, constrained, extractive, free, judge);
``dipreg bridge`` (``bridge_report``) runs them clean, degraded and under prompt interventions.
"""

from dipreg.eval.ledger import state_checksum
from dipreg.eval.mlp import UnsupportedOperatorError
from dipreg.eval.operators import OPERATORS, DegradeError, DegradeReport, degrade, parse_ops

__all__ = [
    "OPERATORS",
    "DegradeError",
    "DegradeReport",
    "UnsupportedOperatorError",
    "degrade",
    "parse_ops",
    "state_checksum",
]
