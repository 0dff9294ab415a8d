"""Kubernetes Quantities and Go durations, as the reference's config fields are written."""

from __future__ import annotations

import re
from typing import Any

from inferoute.epp.plugin import config_error

_QUANTITY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(Ki|Mi|Gi|Ti|k|K|M|G|T)?\s*$")
_MULT = {None: 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_MULT.update({"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40})


def quantity(v: Any, where: str) -> int:
    """A Kubernetes Quantity (``1G``, ``512Mi``, ``1000``) as an integer ≥ 0."""
    if isinstance(v, bool):
        raise config_error(f"{where}: expected a quantity like 1G, 512Mi or 1000, got {v!r}")
    if isinstance(v, int):
        if v < 0:
            raise config_error(f"{where}: must be >= 0, got {v}")
        return v
    m = _QUANTITY.match(str(v)) if isinstance(v, str | float) else None
    if m is None:
        raise config_error(f"{where}: expected a quantity like 1G, 512Mi or 1000, got {v!r}")
    return int(float(m.group(1)) * _MULT[m.group(2)])


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration(v: Any, where: str) -> float:
    """A Go duration (``60s``, ``1m30s``, ``500ms``) or a number of seconds."""
    if isinstance(v, int | float) and not isinstance(v, bool) and v >= 0:
        return float(v)
    if isinstance(v, str):
        s = v.strip()
        parts = _DURATION.findall(s)
        if parts and "".join(a + b for a, b in parts) == s:
            return sum(float(a) * _UNIT[b] for a, b in parts)
        if s == "0":
            return 0.0
    raise config_error(f"{where}: expected a duration like 60s, 500ms or 1m30s, got {v!r}")
