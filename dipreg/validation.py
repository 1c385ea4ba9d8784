"""The checks every option and constructor argument goes through: counts, bounded numbers, depth windows.

Each returns the checked value (converted) or raises one ``ValueError`` line that names the argument as the user gave
it (``"--batch-size"``, ``"DipRegModule: r (the LoRA rank)"``), what it must be, and what it got; a value of the wrong
type is shown with its type (``got True (bool)``). ``True``/``False`` are never numbers here.
"""

from __future__ import annotations

import math
import numbers

__all__ = ["validate_count", "validate_number", "validate_window"]


def _got(value: object, expected: type | tuple[type, ...]) -> str:
    """``value!r``, followed by its type when that is not the expected one (``True (bool)``, ``'abc' (str)``)."""
    wrong_type = isinstance(value, bool) or not isinstance(value, expected)
    return f"{value!r} ({type(value).__name__})" if wrong_type else repr(value)


def validate_count(
    value: object, name: str, minimum: int = 1, meaning: str = "", *, allow_none: bool = False
) -> int | None:
    """Check a count (a batch size, a repeat count, a rank) is an integer ``>= minimum`` and return it as an ``int``.

    Args:
        value: what the user gave.
        name: how the user gave it (``"--batch-size"``).
        minimum: the smallest allowed count.
        meaning: added to the message in parentheses (``"0 = all"``).
        allow_none: ``None`` is allowed too (and returned).

    Example:
        >>> validate_count(16, "--batch-size")
        16
    """
    if allow_none and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        extra = f" ({meaning})" if meaning else ""
        none = " or None" if allow_none else ""
        raise ValueError(f"{name} must be an integer >= {minimum}{none}{extra}, got {_got(value, numbers.Integral)}.")
    return int(value)


def validate_number(
    value: object,
    name: str,
    low: float = -math.inf,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_closed: bool = False,
    what: str = "a finite number",
    hint: str = "",
    error: type[ValueError] = ValueError,
) -> float:
    """Check ``value`` is a finite real number (not a ``bool``) within the bounds and return it as a ``float``.

    Args:
        value: what the user gave.
        name: how the user gave it (``"lr (--lr)"``).
        low: the lower bound, included unless ``low_open``.
        high: the upper bound, excluded unless ``high_closed``; ``None`` for none. With ``high`` the message states an
            interval (``in (0, inf)``), without it an inequality (``> 0``).
        what: what the value is, for the message (``"a fraction of depth"``).
        hint: a sentence added after the message (``"Use 0 to disable it."``).
        error: the ``ValueError`` subclass to raise.

    Example:
        >>> validate_number(0.05, "dropout", 0.0, 1.0)
        0.05
    """
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        above = value > low if low_open else value >= low
        below = high is None or (value <= high if high_closed else value < high)
        ok = above and below
    if not ok:
        if high is not None:
            bounds = f" in {'(' if low_open else '['}{low:g}, {high:g}{']' if high_closed else ')'}"
        elif low > -math.inf:
            bounds = f" {'>' if low_open else '>='} {low:g}"
        else:
            bounds = ""
        tail = f" {hint}" if hint else ""
        raise error(f"{name} must be {what}{bounds}, got {_got(value, numbers.Real)}.{tail}")
    return float(value)  # type: ignore[arg-type]


def validate_window(window: tuple[float, float], name: str = "window") -> tuple[float, float]:
    """Check a relative-depth window ``(lo, hi)`` with ``0 ≤ lo ≤ hi ≤ 1`` and return it as floats."""
    try:
        lo, hi = (float(w) for w in window)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a pair (lo, hi) of relative depths, got {window!r}.") from err
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"{name}={window!r} must satisfy 0 <= lo <= hi <= 1 (relative depths ℓ/L).")
    return lo, hi
