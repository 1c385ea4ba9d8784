"""Named degradation presets: the op lists dipreg's commands, callbacks and recipes use, kept in one place.

A preset name may stand wherever an op list is taken (``dipreg degrade --ops retention``, ``dipreg arms --conditions
clean,arms``, ``CompressionRetention(degradations="retention")``, a recipe's ``degradations: retention``): each item of
a comma-separated spec that is a preset name is replaced by the preset's ops (:func:`expand_presets`, called by
:func:`~dipreg.eval.degradation.operators.parse_ops`). Pure data; imports nothing of dipreg.
"""

from __future__ import annotations

__all__ = ["DEFAULT_OPS", "PRESETS", "expand_presets"]

#: name -> op list (a `dipreg degrade --ops` spec).
PRESETS: dict[str, str] = {
    # the paper's structural + quantization contrast: what `dipreg degrade` runs without --ops
    "paper": "late_svd:rank=64,mid_svd:rank=64,rtn:bits=3,late_drop,mid_prune,deprive:alpha=0",
    # what CompressionRetention measures during training (its default, `dipreg arms` and the monitored recipe)
    "retention": "mid_svd:rank=64,late_svd:rank=64,rtn:bits=3",
    # the conditions every trained arm is evaluated under (besides clean): Table 4's degradations, late block drop,
    # mid pruning (§5.3) and late deprivation α=0, whose flip rate is the "fragility" column
    "arms": "rtn:bits=4,rtn:bits=3,late_svd:rank=64,mid_svd:rank=64,late_drop,mid_prune,deprive:alpha=0",
    # `dipreg bridge`: the degradations its readouts are compared under
    "bridge": "deprive:alpha=0,late_svd:rank=64,mid_prune",
}

#: What `dipreg degrade` runs without --ops.
DEFAULT_OPS = PRESETS["paper"]


def expand_presets(spec: str) -> str:
    """``spec`` with every comma-separated item that names a preset replaced by the preset's op list.

    Example:
        >>> expand_presets("bridge,rtn:bits=4")
        'deprive:alpha=0,late_svd:rank=64,mid_prune,rtn:bits=4'
    """
    return ",".join(PRESETS.get(item.strip(), item) for item in spec.split(","))
