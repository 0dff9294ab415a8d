"""Shared helper: min-max normalisation where lower raw values are better."""

from __future__ import annotations

from collections.abc import Sequence


def lower_is_better(values: Sequence[float]) -> list[float]:
    """``(max - v) / (max - min)``; 1.0 for every value when all are equal (GIE's queue-scorer rule)."""
    if not values:
        return []
    lo = min(values)
    hi = max(values)
    if hi <= lo:
        return [1.0] * len(values)
    span = hi - lo
    return [(hi - v) / span for v in values]
