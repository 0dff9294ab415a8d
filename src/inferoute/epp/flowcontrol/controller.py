"""The flow controller's decisions: pure code over heaps, time passed in, no I/O.

Three tiers, the reference's:

1. **bands** in strict priority order (highest first). The usage-limit policy gives each band a ceiling; a
   non-empty band whose ceiling the pool saturation reaches (``saturation >= ceiling``) stops the cycle — no
   lower band dispatches past it, which is what makes priority strict;
2. **flows** (one per fairness id) within the band, chosen by the band's fairness policy;
3. **items** within the flow, in the band's ordering policy's order.

:meth:`FlowController.enqueue` checks capacity (global and per band, requests and bytes; a limit of 0 is
ignored; exactly at the limit is allowed, one over is not). :meth:`dispatch_one` releases at most one item
for the saturation it is given, so the caller re-measures saturation after every dispatch (the dispatched
request is counted in flight at once). :meth:`expire` evicts items past their budget: the TTL while the pool
has endpoints, the no-endpoint TTL while it has none (re-evaluated, not fixed at enqueue).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass, field

from inferoute.epp.flowcontrol.config import BandConfig, FlowControlConfig
from inferoute.epp.flowcontrol.types import FAR_FUTURE, Flow, FlowItem, Outcome


@dataclass(slots=True)
class Band:
    config: BandConfig
    flows: dict[str, Flow] = field(default_factory=dict)
    count: int = 0
    bytes: int = 0

    @property
    def priority(self) -> int:
        return self.config.priority


class FlowController:
    """Queues, capacity, dispatch order and expiry (see module docstring)."""

    def __init__(self, config: FlowControlConfig) -> None:
        self.config = config
        self.bands: dict[int, Band] = {}
        self._order: list[int] = []
        """Band priorities, highest first."""
        self.count = 0
        self.bytes = 0
        self._ttl_heap: list[tuple[float, int, FlowItem]] = []
        self._no_ep_heap: list[tuple[float, int, FlowItem]] = []
        self.running = True
        self.ceilings: list[float] = []
        """The ceilings of the last dispatch decision, per band of :attr:`order`."""
        self.blocked_at: int | None = None
        """Index in :attr:`order` of the gated band the last :meth:`dispatch_one` stopped at (None: it was
        not blocked)."""
        for p in config.bands:
            self.band(p)

    @property
    def order(self) -> list[int]:
        """Band priorities, highest first."""
        return self._order

    def band(self, priority: int) -> Band:
        """The band of ``priority``, made on demand from the templates."""
        b = self.bands.get(priority)
        if b is None:
            b = self.bands[priority] = Band(self.config.band(priority))
            self._order = sorted(self.bands, reverse=True)
        return b

    # -- admission ----------------------------------------------------------------------------------------
    def has_capacity(self, band: Band, size: int) -> bool:
        cfg = self.config
        if cfg.max_requests and self.count + 1 > cfg.max_requests:
            return False
        if cfg.max_bytes and self.bytes + size > cfg.max_bytes:
            return False
        bc = band.config
        if bc.max_requests and band.count + 1 > bc.max_requests:
            return False
        return not (bc.max_bytes and band.bytes + size > bc.max_bytes)

    def enqueue(self, item: FlowItem, *, pool_empty: bool) -> Outcome | None:
        """Queue ``item``; None when queued, else why not (capacity, not running)."""
        if not self.running:
            return Outcome.REJECTED_OTHER
        band = self.band(item.priority)
        if not self.has_capacity(band, item.size):
            return Outcome.REJECTED_NO_ENDPOINTS if pool_empty else Outcome.REJECTED_CAPACITY
        assert band.config.ordering is not None
        flow = band.flows.get(item.fairness_id)
        if flow is None:
            flow = band.flows[item.fairness_id] = Flow(item.fairness_id, band.config.ordering)
        flow.push(item)
        band.count += 1
        band.bytes += item.size
        self.count += 1
        self.bytes += item.size
        if len(self._ttl_heap) + len(self._no_ep_heap) > 4 * self.count + 1024:
            self._compact()
        if item.ttl is not None:
            heapq.heappush(self._ttl_heap, (item.enqueued_at + item.ttl, item.seq, item))
        if item.no_endpoint_ttl is not None:
            heapq.heappush(self._no_ep_heap, (item.enqueued_at + item.no_endpoint_ttl, item.seq, item))
        return None

    def remove(self, item: FlowItem) -> bool:
        """Take ``item`` out (its client left). False when it had already left the queue."""
        if item.done:
            return False
        self._leave(item)
        return True

    def _leave(self, item: FlowItem) -> None:
        item.done = True
        band = self.bands[item.priority]
        flow = band.flows[item.fairness_id]
        flow.forget(item)
        band.count -= 1
        band.bytes -= item.size
        self.count -= 1
        self.bytes -= item.size
        if flow.count == 0:
            del band.flows[item.fairness_id]  # idle flows go at once (a new one is cheap)

    # -- dispatch -----------------------------------------------------------------------------------------
    def gated(self, saturation: float) -> dict[int, bool]:
        """Band priority → whether its ceiling is reached at ``saturation`` (the ceilings are kept in
        :attr:`ceilings`: a usage-limit policy may change its answer from one call to the next)."""
        self.ceilings = self.config.usage_limit.ceilings(self._order, saturation)
        return {p: saturation >= c for p, c in zip(self._order, self.ceilings, strict=True)}

    def dispatch_one(self, now: float, saturation: float) -> FlowItem | None:
        """The next item to dispatch at ``saturation``, or None (nothing queued, or the first non-empty band
        is gated)."""
        self.blocked_at = None
        if self.count == 0:
            return None
        gated = self.gated(saturation)
        for i, p in enumerate(self._order):
            band = self.bands[p]
            if band.count == 0:
                continue
            if gated[p]:
                self.blocked_at = i
                return None  # strict priority: nothing below a gated non-empty band goes first
            assert band.config.fairness is not None
            flows = list(band.flows.values())
            flow = band.config.fairness.pick_flow(p, flows, now) if len(flows) > 1 else flows[0]
            item = flow.pop()
            self._leave(item)
            return item
        return None

    # -- expiry -------------------------------------------------------------------------------------------
    def expire(self, now: float, *, pool_empty: bool) -> list[tuple[FlowItem, Outcome]]:
        """Items whose budget ran out at ``now`` (already taken out of the queue)."""
        heap = self._no_ep_heap if pool_empty else self._ttl_heap
        outcome = Outcome.EVICTED_NO_ENDPOINTS if pool_empty else Outcome.EVICTED_TTL
        out: list[tuple[FlowItem, Outcome]] = []
        while heap and (heap[0][2].done or heap[0][0] <= now):
            _, _, item = heapq.heappop(heap)
            if not item.done:
                self._leave(item)
                out.append((item, outcome))
        other = self._ttl_heap if pool_empty else self._no_ep_heap
        while other and other[0][2].done:
            heapq.heappop(other)
        return out

    def _compact(self) -> None:
        """Drop the entries of items that already left (dispatched items stay in the expiry heaps until
        they reach the top; under a flood that would keep their requests alive for a whole TTL)."""
        for heap in (self._ttl_heap, self._no_ep_heap):
            heap[:] = [e for e in heap if not e[2].done]
            heapq.heapify(heap)

    def next_deadline(self, *, pool_empty: bool) -> float:
        heap = self._no_ep_heap if pool_empty else self._ttl_heap
        while heap and heap[0][2].done:
            heapq.heappop(heap)
        return heap[0][0] if heap else FAR_FUTURE

    def shutdown(self) -> list[FlowItem]:
        """Stop accepting; every queued item, taken out (the shell answers them 503 shutting-down)."""
        self.running = False
        items = list(self.items())
        for item in items:
            self._leave(item)
        return items

    def items(self) -> Iterator[FlowItem]:
        """Every queued item (any order)."""
        for band in self.bands.values():
            for flow in band.flows.values():
                yield from flow.items()
