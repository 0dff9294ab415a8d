"""The request-control headers the picker reads, current name first, then the deprecated alias.

The reference (llm-d-router) renamed its headers from ``x-gateway-*`` to ``x-llm-d-*`` and still reads the old
names; so do we, so a client written for either keeps working. The current name wins when both are sent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

OBJECTIVE = ("x-llm-d-inference-objective", "x-gateway-inference-objective")
FAIRNESS_ID = ("x-llm-d-inference-fairness-id", "x-gateway-inference-fairness-id")
MODEL_REWRITE = ("x-llm-d-model-name-rewrite", "x-gateway-model-name-rewrite")
SLO_TTFT_MS = ("x-llm-d-slo-ttft-ms", "x-slo-ttft-ms")
SLO_TPOT_MS = ("x-llm-d-slo-tpot-ms", "x-slo-tpot-ms")
REQUEST_TTL_MS = ("x-llm-d-request-ttl-ms", "x-gateway-request-ttl-ms")
"""inferoute's per-request queue TTL (the reference's open TODO); clamped by the band's TTL."""
DROPPED_REASON = "x-llm-d-request-dropped-reason"
"""Response header naming why flow control dropped a request."""
DEFAULT_FAIRNESS_ID = "default-flow"

CONTROL = frozenset((*OBJECTIVE, *FAIRNESS_ID, *MODEL_REWRITE, *SLO_TTFT_MS, *SLO_TPOT_MS, *REQUEST_TTL_MS))
"""Every request-control header name: a request with none of them is prepared without looking any up."""


def first(headers: Mapping[str, str], names: tuple[str, str]) -> str | None:
    """The value of the first of ``names`` present and non-empty (lower-case header names)."""
    for n in names:
        v = headers.get(n)
        if v:
            return v
    return None


def positive_ms(headers: Mapping[str, str], names: tuple[str, str]) -> float | None:
    """A positive finite millisecond value as seconds; None when absent or invalid (the reference ignores
    an invalid SLO header rather than failing the request)."""
    v = first(headers, names)
    if v is None:
        return None
    try:
        ms = float(v)
    except ValueError:
        return None
    if not math.isfinite(ms) or ms <= 0:
        return None
    return ms / 1000.0


class Control(NamedTuple):
    """What a request's control headers ask for (:func:`control`)."""

    rewrite: str | None
    objective: str | None
    fairness_id: str
    slo_ttft: float | None
    slo_tpot: float | None


NO_CONTROL = Control(None, None, DEFAULT_FAIRNESS_ID, None, None)


def control(headers: Mapping[str, str]) -> Control:
    """The request-control headers of a request (current name first, then the alias). Most requests carry
    none: one set test then, no lookups (:data:`CONTROL`)."""
    if CONTROL.isdisjoint(headers):
        return NO_CONTROL
    return Control(
        first(headers, MODEL_REWRITE),
        first(headers, OBJECTIVE),
        first(headers, FAIRNESS_ID) or DEFAULT_FAIRNESS_ID,
        positive_ms(headers, SLO_TTFT_MS),
        positive_ms(headers, SLO_TPOT_MS),
    )
