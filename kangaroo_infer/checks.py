"""The package's one integer check and one real-number check: a bool is not a number here, NaN and infinity are not
finite, and every failure is one message of the form ``NAME must RULE; got VALUE.``"""

from __future__ import annotations

import math
from typing import Any


def is_int(value: Any, low: int | None = None, high: int | None = None) -> bool:
    """An int (not a bool) within [low, high]."""
    if not isinstance(value, int) or isinstance(value, bool):
        return False
    return (low is None or value >= low) and (high is None or value <= high)


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None, rule: str | None = None) -> None:
    """``is_int``, or one error: ``name must <rule>; got <value>.``"""
    if is_int(value, low, high):
        return
    if rule is None:
        rule = f"be an integer in [{low}, {high}]" if high is not None else f"be an integer >= {low}"
    raise ValueError(f"{name} must {rule}; got {value!r}.")


def check_real(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    rule: str | None = None,
    low_open: bool = False,
) -> None:
    """The package's one real-number check: a finite int or float (not a bool, not NaN) within [low, high]
    (``low_open``: (low, high])."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        above = low is None or (value > low if low_open else value >= low)
        if above and (high is None or value <= high):
            return
    if rule is None:
        rule = f"be a finite number {'>' if low_open else '>='} {low}" + ("" if high is None else f" and <= {high}")
    raise ValueError(f"{name} must {rule}; got {value!r}.")
