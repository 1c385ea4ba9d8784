"""`dipreg bench` without `--only` runs only the sections that fit in a few minutes on a CPU; the long ones are
opt-in, and `--help` says which and why."""

from __future__ import annotations

import contextlib
import io

import pytest

from dipreg.bench.run import OPT_IN, SECTIONS, section_names
from dipreg.cli import main


def test_the_monitor_fits_and_the_peers_are_opt_in_and_run_when_named():
    assert set(OPT_IN) == {"monitor", "peers"} <= set(SECTIONS)
    assert section_names() == ["lens", "causal", "hinge"]
    assert section_names(["monitor"]) == ["monitor"]
    assert section_names(["lens", "monitor"], peers=True) == ["lens", "monitor", "peers"]


def test_bench_help_names_the_opt_in_sections_and_the_defaults():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        main(["bench", "--help"])
    assert exit_.value.code == 0
    text = " ".join(out.getvalue().split())
    assert "opt-in, run only when named here: monitor (four 30-step LoRA fits" in text
    assert "(default: all but the opt-in ones: lens,causal,hinge)" in text
