"""Flow control seams (the full queueing/fairness layer is a later issue).

Today: a :class:`SaturationDetector` protocol and GIE's ``utilization-detector``. The director sheds
sheddable requests (priority < 0) with 429 while the pool is saturated (saturation ≥ 1.0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from inferoute.epp.datalayer.metrics import EndpointMetrics


class SaturationDetector(Protocol):
    def saturation(self, endpoints: Sequence[EndpointMetrics]) -> float:
        """0 = idle, ≥ 1.0 = saturated."""
        ...


class UtilizationDetector:
    """GIE's ``utilization-detector``: an endpoint has capacity while its queue is below
    ``queue_depth_threshold`` and its KV usage below ``kv_cache_util_threshold`` (each reduced by
    ``headroom``); the pool's saturation is the fraction of endpoints without capacity — 1.0 (saturated)
    when none has any, or when there are no endpoints at all."""

    def __init__(
        self, queue_depth_threshold: float = 5, kv_cache_util_threshold: float = 0.8, headroom: float = 0.0
    ) -> None:
        self.queue_limit = queue_depth_threshold * (1.0 - headroom)
        self.kv_limit = kv_cache_util_threshold * (1.0 - headroom)

    def saturation(self, endpoints: Sequence[EndpointMetrics]) -> float:
        if not endpoints:
            return 1.0
        full = sum(1 for m in endpoints if m.waiting >= self.queue_limit or m.kv_usage >= self.kv_limit)
        return full / len(endpoints)
