"""``fcfs-ordering-policy`` (the default): first come, first served — the enqueue time."""

from __future__ import annotations

from inferoute.epp.flowcontrol.types import FlowItem

TYPE = "fcfs-ordering-policy"


class FcfsOrdering:
    type_name = TYPE

    def __init__(self, name: str = TYPE) -> None:
        self.name = name

    def key(self, item: FlowItem) -> float:
        return item.enqueued_at
