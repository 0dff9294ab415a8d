"""``kv-cache-utilization-scorer``: prefer endpoints with free KV cache.

Formula: ``1 - kv_usage`` (GIE). Input: scraped ``KVCacheUtilization`` in [0, 1]. Parameters: none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from inferoute.epp.plugin import Params, PluginDeps
from inferoute.epp.scheduling.types import Candidate, CycleContext

TYPE = "kv-cache-utilization-scorer"
ROLE = "scorer"


class KVCacheUtilizationScorer:
    type_name: ClassVar[str] = TYPE

    def __init__(self, name: str) -> None:
        self.name = name

    def score(self, ctx: CycleContext, candidates: Sequence[Candidate]) -> list[float]:
        return [1.0 - c.metrics.kv_usage for c in candidates]


def create(name: str, params: Params, deps: PluginDeps) -> KVCacheUtilizationScorer:
    return KVCacheUtilizationScorer(name)
