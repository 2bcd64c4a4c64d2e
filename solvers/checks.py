"""Argument checks shared by the solvers: a clear ValueError naming the value and what is allowed."""

from __future__ import annotations

import math
import numbers


def check_positive(name: str, value, *, upper: float = math.inf, upper_open: bool = False) -> float:
    """``value`` as a float, or a ValueError that names it and the allowed range."""
    allowed = "a finite number > 0" if upper == math.inf else f"a number in (0, {upper}{')' if upper_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r} is invalid: it must be {allowed}")
    if value > upper or (upper_open and value == upper):
        raise ValueError(f"{name}={value!r} is invalid: it must be {allowed}")
    return float(value)


def check_iterations(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid: it must be an integer >= 1")
    return int(value)
