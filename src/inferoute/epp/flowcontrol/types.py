"""The flow-control vocabulary: queued items, flows, the policy roles and the outcomes.

One Protocol per role (the reference's plugin SDK): :class:`OrderingPolicy` (tier 3: which item of a flow),
:class:`FairnessPolicy` (tier 2: which flow of a band), :class:`UsageLimitPolicy` (the per-band dispatch
ceilings), :class:`SaturationDetector` (how full the pool is).
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from inferoute.epp.scheduling.types import Candidate

FAR_FUTURE = float("inf")


class Outcome(enum.Enum):
    """The reference's ``QueueOutcome`` values (also the ``outcome`` metric label)."""

    DISPATCHED = "Dispatched"
    REJECTED_CAPACITY = "RejectedCapacity"
    REJECTED_NO_ENDPOINTS = "RejectedNoEndpoints"
    REJECTED_OTHER = "RejectedOther"
    EVICTED_TTL = "EvictedTTL"
    EVICTED_NO_ENDPOINTS = "EvictedNoEndpoints"
    EVICTED_CONTEXT_CANCELLED = "EvictedContextCancelled"
    EVICTED_OTHER = "EvictedOther"


_seq = itertools.count()


@dataclass(eq=False, slots=True)
class FlowItem:
    """One queued request. ``payload`` is the shell's (the prepared request and its waiter)."""

    fairness_id: str
    priority: int
    size: int
    """Bytes counted against ``maxBytes`` (the request body)."""
    enqueued_at: float
    ttl: float | None = None
    """Queue-wait budget while the pool has endpoints (None: no expiry)."""
    no_endpoint_ttl: float | None = None
    """Budget while the pool has no endpoints (re-evaluated while queued)."""
    slo_ttft: float | None = None
    input_tokens: int = 0
    payload: Any = None
    seq: int = field(default_factory=lambda: next(_seq))
    done: bool = False
    """Left the queue (dispatched, evicted or cancelled): lazily dropped from the heaps."""

    def expires_at(self, pool_empty: bool) -> float:
        budget = self.no_endpoint_ttl if pool_empty else self.ttl
        return FAR_FUTURE if budget is None else self.enqueued_at + budget


class OrderingPolicy(Protocol):
    """Tier 3: the order of items within one flow (smaller key first)."""

    name: str
    type_name: str

    def key(self, item: FlowItem) -> float: ...


class Flow:
    """The queue of one fairness id in one band: a heap under the band's ordering policy."""

    __slots__ = ("_heap", "bytes", "count", "key", "ordering")

    def __init__(self, key: str, ordering: OrderingPolicy) -> None:
        self.key = key
        self.ordering = ordering
        self._heap: list[tuple[float, int, FlowItem]] = []
        self.count = 0
        self.bytes = 0

    def push(self, item: FlowItem) -> None:
        heapq.heappush(self._heap, (self.ordering.key(item), item.seq, item))
        self.count += 1
        self.bytes += item.size

    def head(self) -> FlowItem | None:
        h = self._heap
        while h and h[0][2].done:
            heapq.heappop(h)
        return h[0][2] if h else None

    def head_key(self) -> tuple[float, int]:
        h = self.head()
        return (FAR_FUTURE, 0) if h is None else (self.ordering.key(h), h.seq)

    def pop(self) -> FlowItem:
        item = self.head()
        assert item is not None
        heapq.heappop(self._heap)
        return item

    def items(self) -> list[FlowItem]:
        return [e[2] for e in self._heap if not e[2].done]

    def forget(self, item: FlowItem) -> None:
        """``item`` left the flow (it stays in the heap, marked done, until it reaches the top)."""
        self.count -= 1
        self.bytes -= item.size


class FairnessPolicy(Protocol):
    """Tier 2: which non-empty flow of a band dispatches next."""

    name: str
    type_name: str

    def pick_flow(self, band_priority: int, flows: Sequence[Flow], now: float) -> Flow: ...


class UsageLimitPolicy(Protocol):
    """Per-band ceilings: band ``i`` (priorities in descending order) dispatches while saturation <
    ceiling[i]."""

    name: str
    type_name: str

    def ceilings(self, priorities: Sequence[int], saturation: float) -> list[float]: ...


class SaturationDetector(Protocol):
    """How full the pool is: 0 idle, 1.0 at the configured thresholds (may exceed 1)."""

    name: str
    type_name: str
    stale_endpoints: int

    def saturation(self, endpoints: Sequence[Candidate], now: float) -> float: ...
