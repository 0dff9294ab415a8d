"""``utilization-detector`` (the reference's default saturation detector).

Endpoint score = max(waiting / queueDepthThreshold, kvUsage / kvCacheUtilThreshold); pool saturation = the
unweighted mean of the scores, not clamped (2.0 means "twice the thresholds on average"). An endpoint whose
metrics are older than ``metricsStalenessThreshold`` (or never scraped) scores 1.0: the reference fails closed
on stale data, so a sheddable request is not admitted on a guess. An empty pool reads 1.0.

As a scheduling filter (:meth:`filter`) it drops endpoints above ``queueDepthThreshold*(1+headroom)`` or
``min(1, kvCacheUtilThreshold*(1+headroom))``, returning every endpoint when that would drop them all.
Parameters: ``queueDepthThreshold`` 5, ``kvCacheUtilThreshold`` 0.8, ``metricsStalenessThreshold`` "200ms",
``headroom`` 0.
"""

from __future__ import annotations

from collections.abc import Sequence

from inferoute.epp.scheduling.types import Candidate

TYPE = "utilization-detector"


class UtilizationDetector:
    type_name = TYPE

    def __init__(
        self,
        queue_depth_threshold: float = 5,
        kv_cache_util_threshold: float = 0.8,
        headroom: float = 0.0,
        staleness: float = 0.2,
        name: str = TYPE,
    ) -> None:
        self.name = name
        self.queue_threshold = max(queue_depth_threshold, 1e-9)
        self.kv_threshold = max(kv_cache_util_threshold, 1e-9)
        self.headroom = headroom
        self.staleness = staleness
        self.stale_endpoints = 0
        """Endpoints counted saturated for stale metrics in the last evaluation."""

    def saturation(self, endpoints: Sequence[Candidate], now: float) -> float:
        if not endpoints:
            self.stale_endpoints = 0
            return 1.0
        total = 0.0
        stale = 0
        qt, kt, limit = self.queue_threshold, self.kv_threshold, self.staleness
        for c in endpoints:
            m = c.metrics
            if m.scraped_at <= 0 or now - m.scraped_at > limit:
                stale += 1
                total += 1.0
                continue
            q = m.waiting / qt
            k = m.kv_usage / kt
            total += q if q > k else k
        self.stale_endpoints = stale
        return total / len(endpoints)

    def filter(self, endpoints: Sequence[Candidate]) -> list[Candidate]:
        q_limit = self.queue_threshold * (1 + self.headroom)
        kv_limit = min(1.0, self.kv_threshold * (1 + self.headroom))
        kept = [c for c in endpoints if c.metrics.waiting <= q_limit and c.metrics.kv_usage <= kv_limit]
        return kept or list(endpoints)
