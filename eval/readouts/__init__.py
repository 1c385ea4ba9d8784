"""Natural-language vignette readouts and the bridge ladder (paper §5.6).

- :mod:`~dipreg.eval.readouts.readout`: the readouts (label, semantic, constrained, extractive, free, judge), built by
  name through :data:`READOUTS` (new readouts register there);
- :mod:`~dipreg.eval.readouts.extraction`: rule-based A/B extraction from generated text;
- :mod:`~dipreg.eval.readouts.generation`: greedy generation and next-token logits, left-padded batches;
- :mod:`~dipreg.eval.readouts.interventions`: prompt-level interface interventions (the contrast class);
- :mod:`~dipreg.eval.readouts.bridge`: `dipreg bridge` (measure, conditions, report) and
  :mod:`~dipreg.eval.readouts.figures` its Figure 7.
"""

from dipreg.eval.readouts.readout import (
    DEFAULT_READOUTS,
    READOUTS,
    Readout,
    ReadoutError,
    ReadoutOptions,
    ReadoutResult,
    ReadoutSession,
    build_readouts,
)

__all__ = [
    "DEFAULT_READOUTS",
    "READOUTS",
    "Readout",
    "ReadoutError",
    "ReadoutOptions",
    "ReadoutResult",
    "ReadoutSession",
    "build_readouts",
]
