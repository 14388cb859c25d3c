"""The one check that configuration values share: a count that must be a positive integer."""

from __future__ import annotations

from typing import Any


def require_positive_int(key: str, value: Any, *, optional: bool = False, hint: str = "") -> None:
    """Refuse ``value`` unless it is an int >= 1 (bools are not counts), or None when ``optional``; ``key`` is the
    override the user would fix (e.g. ``data.max_len``), ``hint`` an optional clause appended to the message."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key}={value!r} must be a positive integer{' or null' if optional else ''}{hint}.")
