"""Named degradation presets: one module owns the op lists, every user refers to it, and a preset name works wherever
an op list is taken."""

from __future__ import annotations

import inspect

import pytest

from dipreg.callbacks import CompressionRetention
from dipreg.eval import DegradeError, parse_ops
from dipreg.eval.arms.evaluate import parse_conditions
from dipreg.eval.arms.plan import ArmsSettings
from dipreg.eval.degradation.operators import OPERATORS
from dipreg.eval.degradation.presets import DEFAULT_OPS, PRESETS
from dipreg.eval.degradation.report import run_degrade
from dipreg.eval.readouts.bridge import run_bridge
from dipreg.recipes import load_recipe

RETENTION = [("mid_svd", {"rank": 64}), ("late_svd", {"rank": 64}), ("rtn", {"bits": 3})]


def test_preset_names_expand_to_their_ops_alone_or_among_operators():
    assert parse_ops("retention") == RETENTION
    assert parse_ops("late_drop,retention,rtn:bits=4,group_size=128") == [
        ("late_drop", {}),
        *RETENTION,
        ("rtn", {"bits": 4, "group_size": 128}),
    ]
    assert not set(PRESETS) & set(OPERATORS)  # a name is either a preset or an operator
    for spec in PRESETS.values():
        parse_ops(spec)
    with pytest.raises(DegradeError, match=r"'retain'.*or a preset: paper, retention, arms, bridge"):
        parse_ops("retain")


def test_every_user_takes_its_default_op_list_from_the_presets():
    assert DEFAULT_OPS == PRESETS["paper"] == inspect.signature(run_degrade).parameters["ops"].default
    assert inspect.signature(run_bridge).parameters["ops"].default == PRESETS["bridge"]
    assert ArmsSettings().retention_ops == PRESETS["retention"]
    assert [label for label, _, _ in parse_conditions(ArmsSettings().conditions)] == [
        "clean",
        "rtn:bits=4",
        "rtn:bits=3",
        "late_svd:rank=64",
        "mid_svd:rank=64",
        "late_drop",
        "mid_prune",
        "deprive:alpha=0",
    ]
    assert parse_conditions("clean,arms") == parse_conditions(ArmsSettings().conditions)
    assert CompressionRetention().specs == RETENTION
    (retention,) = [
        c for c in load_recipe("dip_reg_monitored")["trainer"]["callbacks"] if "Retention" in c["class_path"]
    ]
    assert CompressionRetention(degradations=retention["init_args"]["degradations"]).specs == RETENTION
