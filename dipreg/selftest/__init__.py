"""A self-contained check of dipreg on a machine with a GPU (or, small, on a CPU): ``python -m dipreg.selftest``.

It needs no network and no default model: models are built from configs with seeded random weights, and the
tokenizer is a word-level one made from the stimuli. Three parts, written to one JSON file:

- :mod:`~dipreg.selftest.parity`: tiny models of every supported architecture give the same trajectories, causal
  margins, hinge values and degradation restores on the target device (float32 and bfloat16) as on the CPU in
  float32, within the tolerances stated there;
- :mod:`~dipreg.selftest.timing`: random-weight models from the shipped Qwen2.5-1.5B and -7B configs in bfloat16
  (``--sizes real``; ``tiny`` on a CPU) time the 278-pair logit audit, the causal lens, one DipMonitor probe and 20
  LoRA steps with and without the monitor and the hinge, each as a ratio against a bare forward or a bare step;
- :mod:`~dipreg.selftest.versions`: the library versions found and the versions dipreg needs.
"""

from dipreg.selftest.run import run_selftest

__all__ = ["run_selftest"]
