"""Degradation operators that change a live model and restore it bit-exactly (paper §5.3).

- :mod:`~dipreg.eval.degradation.operators`: the operator table and ``degrade(model, op, **params)``;
- :mod:`~dipreg.eval.degradation.presets`: the named op lists (``paper``, ``retention``, ``arms``, ``bridge``);
- :mod:`~dipreg.eval.degradation.layouts`: finds the weights an operator touches (from the architecture table);
- :mod:`~dipreg.eval.degradation.quantize`: RTN and NF4 fake quantization;
- :mod:`~dipreg.eval.degradation.ledger`: backups, restore, checksums;
- :mod:`~dipreg.eval.degradation.report`: `dipreg degrade` (intact vs degraded, stratified flips, Figure 6).
"""

from dipreg.eval.degradation.layouts import UnsupportedOperatorError
from dipreg.eval.degradation.ledger import state_checksum
from dipreg.eval.degradation.operators import OPERATORS, DegradeError, DegradeReport, degrade, parse_ops
from dipreg.eval.degradation.presets import PRESETS

__all__ = [
    "OPERATORS",
    "PRESETS",
    "DegradeError",
    "DegradeReport",
    "UnsupportedOperatorError",
    "degrade",
    "parse_ops",
    "state_checksum",
]
