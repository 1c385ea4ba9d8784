"""The one set of argument checks (dipreg.validation): what passes, what is refused, and the one line that says so."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dipreg.eval import DegradeError
from dipreg.validation import validate_count, validate_number, validate_window


def test_counts_accept_integers_at_or_above_the_minimum_and_refuse_bools_floats_and_none():
    assert validate_count(np.int64(3), "--n") == 3 and type(validate_count(np.int64(3), "--n")) is int
    assert validate_count(None, "--n", allow_none=True) is None
    with pytest.raises(ValueError, match=r"^--n must be an integer >= 1, got True \(bool\)\.$"):
        validate_count(True, "--n")
    with pytest.raises(ValueError, match=r"^--n must be an integer >= 1, got 2\.0 \(float\)\.$"):
        validate_count(2.0, "--n")
    with pytest.raises(ValueError, match=r"^--n must be an integer >= 0 \(0 = all\), got -1\.$"):
        validate_count(-1, "--n", 0, "0 = all")
    with pytest.raises(ValueError, match=r"^k must be an integer >= 2 or None \(off\), got 1\.$"):
        validate_count(1, "k", 2, "off", allow_none=True)
    with pytest.raises(ValueError, match=r"got None \(NoneType\)"):
        validate_count(None, "--n")


@pytest.mark.parametrize(
    ("value", "kwargs", "message"),
    [
        (0, {"low": 0.0, "low_open": True}, r"^x must be a finite number > 0, got 0\.$"),
        (-1e-9, {"low": 0.0}, r"^x must be a finite number >= 0, got -1e-09\.$"),
        (1.0, {"low": 0.0, "high": 1.0}, r"^x must be a finite number in \[0, 1\), got 1\.0\.$"),
        (math.inf, {"low": 0.0, "high": math.inf, "low_open": True}, r"in \(0, inf\), got inf\.$"),
        (math.nan, {}, r"^x must be a finite number, got nan\.$"),
        (False, {}, r"got False \(bool\)"),
        ("0.5", {"low": 0.0}, r"got '0\.5' \(str\)"),
        (-0.2, {"low": 0.0, "hint": "Use 0 to disable it."}, r">= 0, got -0\.2\. Use 0 to disable it\.$"),
    ],
)
def test_numbers_outside_their_bounds_or_not_finite_reals_are_refused_in_one_line(value, kwargs, message):
    with pytest.raises(ValueError, match=message):
        validate_number(value, "x", **kwargs)


def test_numbers_inside_their_bounds_come_back_as_floats_and_the_error_type_is_the_callers():
    assert validate_number(1, "x", 0.0, 1.0, high_closed=True) == 1.0
    assert type(validate_number(np.float32(0.5), "x", 0.0, 1.0)) is float
    with pytest.raises(DegradeError, match=r"^f must be a fraction of depth in \(0, 1\], got 0\.0\.$"):
        validate_number(
            0.0, "f", 0.0, 1.0, low_open=True, high_closed=True, what="a fraction of depth", error=DegradeError
        )


def test_windows_are_ordered_relative_depths():
    assert validate_window((0, 1)) == (0.0, 1.0)
    with pytest.raises(ValueError, match="0 <= lo <= hi <= 1"):
        validate_window((0.9, 0.2))
    with pytest.raises(ValueError, match="a pair"):
        validate_window(0.5)
