"""``edf-ordering-policy``: earliest deadline first, deadline = enqueue time + effective TTL.

An item without a TTL gets a far-future deadline (it goes after every item that has one).
"""

from __future__ import annotations

from inferoute.epp.flowcontrol.types import FAR_FUTURE, FlowItem

TYPE = "edf-ordering-policy"


class EdfOrdering:
    type_name = TYPE

    def __init__(self, name: str = TYPE) -> None:
        self.name = name

    def key(self, item: FlowItem) -> float:
        return FAR_FUTURE if item.ttl is None else item.enqueued_at + item.ttl
