"""``round-robin-fairness-policy``: one cursor per band over the flow keys in sorted (deterministic) order;
each dispatch goes to the next non-empty flow after the last one served. Two tenants sending 10:1 get equal
dispatch shares while both have work queued."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from inferoute.epp.flowcontrol.types import Flow

TYPE = "round-robin-fairness-policy"


class RoundRobinFairness:
    type_name = TYPE

    def __init__(self, name: str = TYPE) -> None:
        self.name = name
        self._last: dict[int, str] = {}
        """Band priority → key of the flow served last."""

    def pick_flow(self, band_priority: int, flows: Sequence[Flow], now: float) -> Flow:
        ordered = sorted(flows, key=lambda f: f.key)
        last = self._last.get(band_priority)
        i = 0 if last is None else bisect.bisect_right([f.key for f in ordered], last) % len(ordered)
        flow = ordered[i]
        self._last[band_priority] = flow.key
        return flow
