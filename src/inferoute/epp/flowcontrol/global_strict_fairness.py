"""``global-strict-fairness-policy`` (the default): the flow whose head item is best under the ordering
policy across the whole band — no fairness between flows, one global order."""

from __future__ import annotations

from collections.abc import Sequence

from inferoute.epp.flowcontrol.types import Flow

TYPE = "global-strict-fairness-policy"


class GlobalStrictFairness:
    type_name = TYPE

    def __init__(self, name: str = TYPE) -> None:
        self.name = name

    def pick_flow(self, band_priority: int, flows: Sequence[Flow], now: float) -> Flow:
        return min(flows, key=Flow.head_key)
