"""In-flight eviction (``flowControl.enableEviction``): pure decisions, time passed in, no I/O.

The reference's design (llm-d-router's ``flow-control-eviction`` proposal and its reclamation controller):
dispatch grants a *lease* on pool capacity that lasts until the response ends; eviction revokes sheddable
leases when higher-priority demand is queued behind saturation.

* **Tracker / selector** (:class:`LeaseQueue`): every dispatched request is a :class:`Lease`; only priority
  < 0 is evictable (``sheddable-eviction-filter``), lowest priority first, among equals the most recently
  dispatched (``priority-then-time-eviction-order-policy``: the least work thrown away).
* **Trigger** (:func:`eligible_demand`): when dispatch stops at a gated band, the first band at or below it
  whose priority is strictly above the next victim's, whose ceiling is not 0, whose ceiling the saturation
  reaches, and which has queued requests.
* **Sizing** (:meth:`Reclamation.reclaim`), in saturation units: ``deficit = saturation - ceiling``,
  ``credit = saturation / leases in flight`` (mean footprint), ``n = max(1, ceil((deficit - pending) /
  credit))`` capped at :data:`MAX_REVOCATIONS_PER_DECISION` (2) and at the evictable count; no victim at or
  above the demand's priority.
* **Pacing** (:meth:`Reclamation.gate_open`): a new decision only when every revocation is confirmed (its
  response ended) and ``grace`` has passed since (the gauge must show the freed capacity first). A
  revocation unconfirmed after :data:`CONFIRMATION_TIMEOUT` (10 s) counts as confirmed (``timed_out``).
  The grace is derived from the detector: 10 ms for ``concurrency-detector`` (its counts drop when the
  response ends), else the metrics refresh interval + staleness threshold + 250 ms of engine abort.

An evicted request is answered 429 ``request evicted by flow control`` with ``x-llm-d-request-dropped-reason:
evicted`` when nothing of its answer was sent yet, else its stream is cut.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

MAX_REVOCATIONS_PER_DECISION = 2
CONFIRMATION_TIMEOUT = 10.0
CONCURRENCY_GRACE = 0.010
ENGINE_ABORT_BUDGET = 0.250

_seq = itertools.count()


def confirmation_grace(detector_type: str, refresh_interval: float, staleness: float) -> float:
    """The pacing grace for a saturation detector (see module docstring)."""
    if detector_type == "concurrency-detector":
        return CONCURRENCY_GRACE
    return refresh_interval + staleness + ENGINE_ABORT_BUDGET


@dataclass(eq=False, slots=True)
class Lease:
    """One dispatched request. ``revoke`` is the actuator (ends the request's answer)."""

    priority: int
    dispatched_at: float
    revoke: Callable[[], None]
    seq: int = field(default_factory=lambda: next(_seq))
    ended: bool = False
    """Its response ended (or it was revoked): no longer a candidate."""
    revoked_at: float | None = None
    credit: float = 0.0


def sheddable(lease: Lease) -> bool:
    """``sheddable-eviction-filter``: only priority < 0 may be evicted."""
    return lease.priority < 0


class LeaseQueue:
    """The tracked leases and the evictable ones in victim order (see module docstring)."""

    def __init__(self, eligible: Callable[[Lease], bool] = sheddable) -> None:
        self.eligible = eligible
        self.in_flight = 0
        self.evictable = 0
        self._heap: list[tuple[int, float, int, Lease]] = []

    def track(self, lease: Lease) -> None:
        self.in_flight += 1
        if self.eligible(lease):
            self.evictable += 1
            # lowest priority first; among equals the newest dispatch (largest time, then sequence)
            heapq.heappush(self._heap, (lease.priority, -lease.dispatched_at, -lease.seq, lease))

    def untrack(self, lease: Lease) -> None:
        """The lease's response ended (idempotent)."""
        if lease.ended:
            return
        lease.ended = True
        self.in_flight -= 1
        if self.eligible(lease):
            self.evictable -= 1

    def _top(self) -> Lease | None:
        h = self._heap
        while h and h[0][3].ended:
            heapq.heappop(h)
        return h[0][3] if h else None

    def peek_priority(self) -> int | None:
        top = self._top()
        return None if top is None else top.priority

    def pop(self, below: int) -> Lease | None:
        """The next victim with priority strictly below ``below`` (taken out), or None."""
        top = self._top()
        if top is None or top.priority >= below:
            return None
        heapq.heappop(self._heap)
        self.untrack(top)
        return top


class ReclamationMetrics(Protocol):
    def issued(self, n: int) -> None: ...

    def retired(self, outcome: str, seconds: float) -> None: ...

    def target(self, value: float) -> None: ...

    def pending(self, value: float) -> None: ...


def eligible_demand(
    saturation: float,
    priorities: Sequence[int],
    ceilings: Sequence[float],
    break_idx: int,
    queued: Callable[[int], int],
    victim_priority: int,
) -> tuple[int, float] | None:
    """``(demand priority, its ceiling)`` of the first blocked band with queued requests that dominates the
    victim, scanning from the band where dispatch stopped (``priorities`` highest first)."""
    for j in range(break_idx, len(priorities)):
        p = priorities[j]
        if p <= victim_priority:
            return None
        c = ceilings[j]
        if c <= 0 or saturation < c:
            continue  # unattainable by policy / not blocked (it dispatches next cycle)
        if queued(p):
            return p, c
    return None


class Reclamation:
    """When to revoke and how many (see module docstring). ``now`` is passed in."""

    def __init__(
        self,
        leases: LeaseQueue,
        grace: float,
        *,
        max_per_decision: int = MAX_REVOCATIONS_PER_DECISION,
        timeout: float = CONFIRMATION_TIMEOUT,
        metrics: ReclamationMetrics | None = None,
    ) -> None:
        self.leases = leases
        self.grace = grace
        self.max_per_decision = max_per_decision
        self.timeout = timeout
        self.metrics = metrics
        self.outstanding: dict[int, Lease] = {}
        self.cooling: list[tuple[float, float]] = []
        """(expires at, credit) of confirmed revocations still settling."""
        self.pending = 0.0

    def gate_open(self, now: float) -> bool:
        for seq, lease in list(self.outstanding.items()):
            assert lease.revoked_at is not None
            if now - lease.revoked_at >= self.timeout:
                del self.outstanding[seq]
                self._cool(lease, now, "timed_out")
        kept = [(t, c) for t, c in self.cooling if now < t]
        if len(kept) != len(self.cooling):
            self.cooling = kept
            self.pending = max(
                0.0, sum(c for _, c in kept) + sum(x.credit for x in self.outstanding.values())
            )
            if self.metrics is not None:
                self.metrics.pending(self.pending)
        return not self.outstanding and not self.cooling

    def next_wake(self) -> float:
        """When the gate may open by time alone (cooling ends, a revocation times out); inf: never."""
        times = [t for t, _ in self.cooling]
        times += [x.revoked_at + self.timeout for x in self.outstanding.values() if x.revoked_at is not None]
        return min(times, default=math.inf)

    def maybe_reclaim(
        self,
        now: float,
        saturation: float,
        priorities: Sequence[int],
        ceilings: Sequence[float],
        break_idx: int,
        queued: Callable[[int], int],
    ) -> list[Lease]:
        """The trigger on a head-of-line break at band ``break_idx``: the revocations issued (maybe none)."""
        if not self.gate_open(now):
            return []
        victim = self.leases.peek_priority()
        if victim is None:
            return []
        demand = eligible_demand(saturation, priorities, ceilings, break_idx, queued, victim)
        if demand is None:
            return []
        return self.reclaim(now, saturation, demand[1], demand[0])

    def reclaim(self, now: float, saturation: float, ceiling: float, demand_priority: int) -> list[Lease]:
        leases = self.leases
        if leases.in_flight <= 0 or leases.evictable <= 0:
            return []
        credit = saturation / leases.in_flight
        if not credit > 0 or math.isinf(credit):
            return []
        deficit = saturation - ceiling
        if self.metrics is not None:
            self.metrics.target(deficit)
        net = deficit - self.pending
        if net < 0 or (net == 0 and self.pending > 0):
            return []
        n = min(max(1, math.ceil(net / credit)), self.max_per_decision, leases.evictable)
        out: list[Lease] = []
        for _ in range(n):
            lease = leases.pop(demand_priority)
            if lease is None:
                break
            lease.revoked_at, lease.credit = now, credit
            self.outstanding[lease.seq] = lease
            self.pending += credit
            out.append(lease)
        if self.metrics is not None and out:
            self.metrics.issued(len(out))
            self.metrics.pending(self.pending)
        return out

    def confirm(self, lease: Lease, now: float) -> None:
        """A revoked request's answer ended (late confirmations after a timeout are ignored)."""
        if self.outstanding.pop(lease.seq, None) is None:
            return
        self._cool(lease, now, "confirmed")

    def _cool(self, lease: Lease, now: float, outcome: str) -> None:
        self.cooling.append((now + self.grace, lease.credit))
        if self.metrics is not None:
            assert lease.revoked_at is not None
            self.metrics.retired(outcome, now - lease.revoked_at)
