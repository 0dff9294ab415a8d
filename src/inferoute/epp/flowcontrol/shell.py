"""The asyncio shell of flow control: it only waits. Decisions are :class:`~.controller.FlowController`'s.

:meth:`FlowControl.pick` queues a prepared request and runs a dispatch cycle at once; when the request is
released in that cycle (the common, unsaturated case) it is scheduled and answered synchronously — no
future, no task, no timer. Otherwise the caller awaits a future that a later cycle resolves with the
scheduling decision (made at dispatch time, so the next dispatch sees it in flight) or with a drop.

A later cycle runs when a response ends (sessions are wrapped to report it), when fresh metrics arrive
(datastore listener), and at the next queue deadline (one ``call_later`` handle, re-armed as needed). A
cancelled waiter (the client left: the gateway's handler or the ext_proc stream was cancelled) leaves the
queue at once and is counted ``EvictedContextCancelled``; one that was released in the same instant gets its
session aborted, so no in-flight count leaks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from inferoute.clock import Clock
from inferoute.epp.flowcontrol.config import FlowControlConfig
from inferoute.epp.flowcontrol.controller import FlowController
from inferoute.epp.flowcontrol.eviction import CONCURRENCY_GRACE, Lease, LeaseQueue, Reclamation
from inferoute.epp.flowcontrol.outcomes import translate
from inferoute.epp.flowcontrol.program_aware_fairness import ProgramAwareFairness
from inferoute.epp.flowcontrol.signals import FlowControlMetrics
from inferoute.epp.flowcontrol.stages import stage_saturation
from inferoute.epp.flowcontrol.types import FlowItem, Outcome
from inferoute.epp.requestcontrol import headers as hdr
from inferoute.epp.scheduling.types import Candidate, InferenceRequest
from inferoute.errors import error_body
from inferoute.picking import (
    Decision,
    Destination,
    NullSession,
    PickSession,
    Reject,
    report_endpoint_failed,
)

log = logging.getLogger(__name__)

Result = tuple[Decision, PickSession]


class PreparedRequest(Protocol):
    request: InferenceRequest
    size: int


class Scheduling(Protocol):
    """What flow control needs from the director."""

    def schedule(self, prep: Any, *, admission: bool) -> Result: ...

    def all_candidates(self, now: float) -> list[Candidate]: ...


class _Waiter:
    __slots__ = ("future", "prep", "result")

    def __init__(self, prep: PreparedRequest) -> None:
        self.prep = prep
        self.future: asyncio.Future[Result] | None = None
        self.result: Result | None = None


class FlowControl:
    """Queue, wait, dispatch (see module docstring)."""

    def __init__(
        self,
        config: FlowControlConfig,
        director: Scheduling,
        clock: Clock,
        metrics: FlowControlMetrics | None = None,
        *,
        eviction_grace: float = CONCURRENCY_GRACE,
    ) -> None:
        self.config = config
        self.core = FlowController(config)
        self.director = director
        self.clock = clock
        self.metrics = metrics
        self.saturation = 0.0
        """Pool saturation measured by the last cycle."""
        self._cycling = False
        self._again = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self.leases: LeaseQueue | None = None
        self.reclamation: Reclamation | None = None
        """In-flight eviction (``enableEviction``); None when off."""
        if config.enable_eviction:
            self.leases = LeaseQueue()
            self.reclamation = Reclamation(self.leases, eviction_grace, metrics=metrics)
        self._las = [
            b.fairness
            for b in [config.default_band, *config.bands.values()]
            if isinstance(b.fairness, ProgramAwareFairness)
        ]

    # -- the request path ---------------------------------------------------------------------------------
    async def pick(self, prep: PreparedRequest) -> Result:
        item = self._item(prep)
        waiter: _Waiter = item.payload
        pool = self.director.all_candidates(item.enqueued_at)
        outcome = self.core.enqueue(item, pool_empty=not pool)
        if outcome is not None:
            return self._drop(item, outcome, pool_empty=not pool)
        self.run_cycle(pool)
        if waiter.result is not None:
            return waiter.result
        waiter.future = asyncio.get_running_loop().create_future()
        self._arm()
        try:
            return await waiter.future
        except asyncio.CancelledError:
            if self.core.remove(item):
                self._count(item, Outcome.EVICTED_CONTEXT_CANCELLED)
            elif waiter.result is not None:
                waiter.result[1].aborted("client-disconnect")
            raise

    def _item(self, prep: PreparedRequest) -> FlowItem:
        req = prep.request
        ttl = self.config.default_ttl
        asked = hdr.positive_ms(req.headers, hdr.REQUEST_TTL_MS)
        if asked is not None:
            ttl = asked if ttl is None else min(asked, ttl)  # clamped by the configured budget
        no_ep = self.config.no_endpoint_ttl
        if asked is not None and no_ep is not None:
            no_ep = min(asked, no_ep)
        return FlowItem(
            req.fairness_id,
            req.priority,
            prep.size,
            self.clock.now(),
            ttl=ttl,
            no_endpoint_ttl=no_ep,
            slo_ttft=req.slo_ttft,
            input_tokens=req.prompt_tokens,
            payload=_Waiter(prep),
        )

    # -- cycles -------------------------------------------------------------------------------------------
    def run_cycle(self, pool: Sequence[Candidate] | None = None) -> None:
        """Expire what ran out, then dispatch while the bands' ceilings allow. Not re-entered: a change
        reported during a cycle (a session ended by an eviction or a cancellation) runs one more cycle after
        it."""
        if self._cycling:
            self._again = True
            return
        self._cycling = True
        try:
            while True:
                self._again = False
                self._cycle(pool)
                if not self._again or not self.core.count:
                    break
                pool = None  # measure again
        finally:
            self._cycling = False

    def _cycle(self, pool: Sequence[Candidate] | None) -> None:
        core = self.core
        if core.count == 0:
            return
        t0 = time.perf_counter()
        now = self.clock.now()
        if pool is None:
            pool = self.director.all_candidates(now)
        for item, outcome in core.expire(now, pool_empty=not pool):
            self._resolve(item, self._drop(item, outcome, pool_empty=not pool))
        detector = self.config.detector
        while core.count:
            self.saturation = stage_saturation(detector, pool, now)["effective"]
            released = core.dispatch_one(now, self.saturation)
            if released is None:
                break
            self._count(released, Outcome.DISPATCHED)
            result = self.director.schedule(released.payload.prep, admission=False)
            self._resolve(released, (result[0], self._session(released, result, now)))
            pool = self.director.all_candidates(now)  # in-flight counts are per view: read them again
        if self.reclamation is not None and core.blocked_at is not None:
            self._evict(now)
        if self.metrics is not None:
            self.metrics.cycle(time.perf_counter() - t0)
        if self._timer is not None or core.count:
            self._arm(pool_empty=not pool)

    def _session(self, item: FlowItem, result: Result, now: float) -> _FlowSession:
        session = _FlowSession(self, item, result[1])
        if self.leases is not None and isinstance(result[0], Destination):
            session.lease = Lease(item.priority, now, session.evict)
            self.leases.track(session.lease)
        return session

    def _evict(self, now: float) -> None:
        """Dispatch stopped at a gated band: revoke sheddable in-flight requests if the reclamation
        controller says so (see :mod:`~inferoute.epp.flowcontrol.eviction`)."""
        core, rec = self.core, self.reclamation
        assert rec is not None and core.blocked_at is not None
        for lease in rec.maybe_reclaim(
            now,
            self.saturation,
            core.order,
            core.ceilings,
            core.blocked_at,
            lambda p: core.bands[p].count,
        ):
            log.info("flow control evicts an in-flight request (priority %s)", lease.priority)
            lease.revoke()

    def _resolve(self, item: FlowItem, result: Result) -> None:
        waiter: _Waiter = item.payload
        waiter.result = result
        fut = waiter.future
        if fut is None:
            return  # the caller is still inside pick(): it reads waiter.result
        if fut.done():  # cancelled in the same instant: nobody will end this session
            result[1].aborted("client-disconnect")
            return
        fut.set_result(result)

    def _arm(self, *, pool_empty: bool | None = None) -> None:
        if pool_empty is None:
            pool_empty = not self.director.all_candidates(self.clock.now())
        at = self.core.next_deadline(pool_empty=pool_empty)
        if self.reclamation is not None and self.core.count:
            at = min(at, self.reclamation.next_wake())
        if at == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = at
        if at != float("inf"):
            delay = max(0.0, at - self.clock.now()) + 0.0005
            self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        self.kick()

    def kick(self) -> None:
        """Something changed (a response ended, metrics arrived): run a cycle if anything is queued."""
        if self.core.count:
            try:
                self.run_cycle()
            except Exception:
                log.exception("flow-control dispatch cycle failed")

    # -- endings ------------------------------------------------------------------------------------------
    def _drop(self, item: FlowItem, outcome: Outcome, *, pool_empty: bool) -> Result:
        self._count(item, outcome)
        d = translate(outcome, pool_empty=pool_empty)
        headers: Mapping[str, str] = {"content-type": "application/json"}
        if d.reason:
            headers = {**headers, hdr.DROPPED_REASON: d.reason}
        log.info("flow control dropped a request (%s, priority %s): %s", d.reason, item.priority, d.message)
        return Reject(d.status, error_body(d.status, d.message), headers, d.cause), NullSession()

    def _count(self, item: FlowItem, outcome: Outcome) -> None:
        if self.metrics is None:
            return
        req = item.payload.prep.request
        waited = self.clock.now() - item.enqueued_at
        self.metrics.outcome(
            outcome.value, item.priority, item.fairness_id, req.model, req.target_model, waited
        )

    def completed(
        self, item: FlowItem, input_tokens: int, output_tokens: int, lease: Lease | None = None
    ) -> None:
        """A dispatched request's response ended: its lease (confirming an eviction), service for LAS
        fairness, then a cycle (capacity freed)."""
        now = self.clock.now()
        if lease is not None and self.leases is not None and self.reclamation is not None:
            self.leases.untrack(lease)
            if lease.revoked_at is not None:
                self.reclamation.confirm(lease, now)
        for las in self._las:
            assert las is not None
            las.record(item.fairness_id, input_tokens, output_tokens, now)
        self.kick()

    def close(self) -> None:
        """Stop: every queued request gets 503 ``rejected-shutting-down``."""
        for item in self.core.shutdown():
            self._resolve(item, self._drop(item, Outcome.REJECTED_OTHER, pool_empty=False))
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _FlowSession:
    """The director's session, reporting the response's end back to flow control; evictable (see
    :class:`~inferoute.picking.EvictableSession`) when eviction is on."""

    __slots__ = ("_evict_handler", "_evicted", "_flow", "_inner", "_item", "lease")

    def __init__(self, flow: FlowControl, item: FlowItem, inner: PickSession) -> None:
        self._flow, self._item, self._inner = flow, item, inner
        self.lease: Lease | None = None
        self._evict_handler: Callable[[], None] | None = None
        self._evicted = False

    def on_evict(self, handler: Callable[[], None]) -> None:
        self._evict_handler = handler
        if self._evicted and self._flow is not None:
            handler()

    def evict(self) -> None:
        """Revoke the request (the lease's actuator): the data plane's handler ends its answer."""
        if self._evicted or self._flow is None:
            return
        self._evicted = True
        if self._evict_handler is not None:
            try:
                self._evict_handler()
            except Exception:
                log.exception("eviction handler")

    def response_started(self, served: str, status: int, headers: Mapping[str, str]) -> None:
        self._inner.response_started(served, status, headers)

    def response_chunk(self, chunk: bytes) -> None:
        self._inner.response_chunk(chunk)

    def response_finished(self) -> None:
        self._inner.response_finished()
        self._done()

    def endpoint_failed(self, endpoint: str, reason: str) -> None:
        report_endpoint_failed(self._inner, endpoint, reason)

    def aborted(self, reason: str) -> None:
        self._inner.aborted(reason)
        self._done()

    def _done(self) -> None:
        flow, self._flow = self._flow, None  # type: ignore[assignment]
        if flow is None:
            return
        usage = getattr(self._inner, "usage", None)
        out = usage.completion_tokens if usage is not None else 0
        inp = usage.prompt_tokens if usage is not None else self._item.input_tokens
        try:
            flow.completed(self._item, inp, out, self.lease)
        except Exception:
            log.exception("flow-control completion")
