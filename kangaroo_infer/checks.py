"""The package's one number predicate (``is_real``) and its integer and real checks: a bool is not a number here,
NaN and infinity are not finite, and every failure is one message of the form ``NAME must RULE; got VALUE.``
(kangaroo_train's config checks build on ``is_real`` with their own wording.)"""

from __future__ import annotations

import math
from typing import Any


def is_real(
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> bool:
    """A finite int or float (not a bool, not NaN or infinity) within [low, high]; ``low_open`` / ``high_open``
    exclude that end. An int is compared exactly, however large (never converted to a float)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return False
    above = low is None or (value > low if low_open else value >= low)
    return above and (high is None or (value < high if high_open else value <= high))


def is_int(value: Any, low: int | None = None, high: int | None = None) -> bool:
    """An int (not a bool) within [low, high]."""
    return isinstance(value, int) and is_real(value, low, high)


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
    """``is_real`` within [low, high] (``low_open``: (low, high]), or one error: ``name must <rule>; got <value>.``"""
    if is_real(value, low, high, low_open):
        return
    if rule is None:
        rule = f"be a finite number {'>' if low_open else '>='} {low}" + ("" if high is None else f" and <= {high}")
    raise ValueError(f"{name} must {rule}; got {value!r}.")
