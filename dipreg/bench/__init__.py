"""`dipreg bench`: speed and memory claims as ratios against references measured in the same run.

- :mod:`~dipreg.bench.core`: the shared context, the :class:`~dipreg.bench.core.Ratio` record and the timer;
- :mod:`~dipreg.bench.lens`, :mod:`~dipreg.bench.causal`, :mod:`~dipreg.bench.hinge`, :mod:`~dipreg.bench.monitor`:
  one section each;
- :mod:`~dipreg.bench.run`: the section registry and :func:`run_bench`.
"""

from dipreg.bench.run import SECTIONS, load_sections, run_bench

__all__ = ["SECTIONS", "load_sections", "run_bench"]
