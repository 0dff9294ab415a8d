"""In-flight eviction (``enableEviction``): selector, trigger, sizing, pacing (pure, times passed in), then
the shell over a real director with a FakeClock (no sockets, no sleeps)."""

from __future__ import annotations

import asyncio

import pytest
from test_epp_flowcontrol_shell import prep, rig_and_flow

from inferoute.epp.flowcontrol.eviction import (
    CONFIRMATION_TIMEOUT,
    Lease,
    LeaseQueue,
    Reclamation,
    confirmation_grace,
    eligible_demand,
)
from inferoute.picking import Destination, evictable


def lease(priority: int, at: float, log: list[Lease] | None = None) -> Lease:
    holder: list[Lease] = []
    le = Lease(priority, at, lambda: log.append(holder[0]) if log is not None else None)
    holder.append(le)
    return le


def test_only_sheddable_leases_are_victims_lowest_priority_then_newest_first() -> None:
    q = LeaseQueue()
    a, b, c, d = lease(-1, 1.0), lease(-1, 2.0), lease(-2, 0.5), lease(0, 3.0)
    for x in (a, b, c, d):
        q.track(x)
    assert (q.in_flight, q.evictable) == (4, 3)
    assert q.peek_priority() == -2
    assert q.pop(below=0) is c
    assert q.pop(below=0) is b  # same priority: the most recently dispatched (least work lost)
    q.untrack(a)  # its response ended: no longer a victim
    assert q.pop(below=0) is None and q.peek_priority() is None
    assert (q.in_flight, q.evictable) == (1, 0)
    q.untrack(a)  # idempotent
    assert q.in_flight == 1


def test_no_victim_at_or_above_the_demand_priority() -> None:
    q = LeaseQueue()
    q.track(x := lease(-1, 1.0))
    assert q.pop(below=-1) is None
    assert q.pop(below=0) is x


@pytest.mark.parametrize(
    ("sat", "ceilings", "queued", "victim", "want"),
    [
        (1.0, [1.0, 0.5], {10: 1, -1: 0}, -1, (10, 1.0)),  # blocked band with demand above the victim
        (1.0, [1.0, 0.5], {10: 1}, 10, None),  # demand not strictly above the victim: no same-band churn
        (0.9, [1.0, 0.5], {10: 1, 0: 3}, -1, (0, 0.5)),  # band 10 not blocked (it dispatches): next one
        (1.0, [0.0, 0.5], {10: 1, 0: 2}, -1, (0, 0.5)),  # a zero ceiling is policy, never demand
        (1.0, [1.0, 0.5], {10: 0, 0: 0}, -1, None),  # nothing queued
    ],
)
def test_trigger(
    sat: float, ceilings: list[float], queued: dict[int, int], victim: int, want: tuple[int, float] | None
) -> None:
    got = eligible_demand(sat, [10, 0], ceilings, 0, lambda p: queued.get(p, 0), victim)
    assert got == want


def test_sizing_is_the_deficit_in_mean_footprints_capped_at_two() -> None:
    q = LeaseQueue()
    for i in range(8):
        q.track(lease(-1, float(i)))
    r = Reclamation(q, grace=0.5)
    # 8 leases at saturation 1.6: credit 0.2; deficit 1.6 - 1.0 = 0.6 -> 3, capped at 2
    issued = r.reclaim(10.0, 1.6, 1.0, 0)
    assert [x.dispatched_at for x in issued] == [7.0, 6.0]
    assert r.pending == pytest.approx(0.4)


def test_exactly_at_the_ceiling_still_revokes_one() -> None:
    q = LeaseQueue()
    for i in range(4):
        q.track(lease(-1, float(i)))
    assert len(Reclamation(q, grace=0.5).reclaim(1.0, 1.0, 1.0, 0)) == 1


def test_pacing_waits_for_confirmation_and_grace_and_times_out() -> None:
    q = LeaseQueue()
    revoked: list[Lease] = []
    for i in range(4):
        q.track(lease(-1, float(i), revoked))
    r = Reclamation(q, grace=0.5)
    queued = {10: 1}

    def decide(now: float) -> list[Lease]:
        out = r.maybe_reclaim(now, 1.0, [10, -1], [1.0, 1.0], 0, lambda p: queued.get(p, 0))
        for x in out:
            x.revoke()
        return out

    first = decide(1.0)
    assert len(first) == 1 and revoked == first
    assert decide(1.1) == [] and not r.gate_open(1.1)  # outstanding: stop and wait
    r.confirm(first[0], 1.2)
    assert not r.gate_open(1.5) and r.next_wake() == pytest.approx(1.7)
    assert r.gate_open(1.7) and r.pending == 0
    second = decide(1.7)
    assert len(second) == 1
    # never confirmed: after the timeout it counts as confirmed, then cools for the grace
    assert not r.gate_open(1.7 + CONFIRMATION_TIMEOUT - 0.01)
    assert not r.gate_open(1.7 + CONFIRMATION_TIMEOUT)
    assert r.gate_open(1.7 + CONFIRMATION_TIMEOUT + 0.5)
    r.confirm(second[0], 20.0)  # a late confirmation is ignored
    assert r.gate_open(20.0)


def test_grace_follows_the_detector() -> None:
    assert confirmation_grace("concurrency-detector", 0.05, 2.0) == pytest.approx(0.01)
    assert confirmation_grace("utilization-detector", 0.05, 2.0) == pytest.approx(2.3)


EVICTING = """
featureGates: [flowControl]
plugins:
- type: queue-scorer
- {type: concurrency-detector, parameters: {maxConcurrency: 2}}
objectives: {chat: 10, batch: -1}
flowControl:
  enableEviction: true
"""


async def test_blocked_interactive_request_evicts_the_newest_batch_request() -> None:
    rig, flow = rig_and_flow(config=EVICTING)
    batch = {"x-llm-d-inference-objective": "batch"}
    d1, s1 = await flow.pick(prep(rig, batch))
    rig.clock.advance(1)
    d2, s2 = await flow.pick(prep(rig, batch))
    assert isinstance(d1, Destination) and isinstance(d2, Destination)
    evicted: list[str] = []
    for name, s in (("first", s1), ("second", s2)):
        e = evictable(s)
        assert e is not None
        e.on_evict(lambda name=name, s=s: (evicted.append(name), s.aborted("evicted")))  # type: ignore[misc]
    high = asyncio.ensure_future(flow.pick(prep(rig, {"x-llm-d-inference-objective": "chat"})))
    d3, s3 = await asyncio.wait_for(high, 1)  # the eviction freed a slot in the same cycle
    assert isinstance(d3, Destination)
    assert evicted == ["second"]  # newest first
    assert rig.value("llm_d_epp_flow_control_revocations_issued_total", {"inference_pool": "pool"}) == 1
    assert (
        rig.value(
            "llm_d_epp_flow_control_revocations_total", {"outcome": "confirmed", "inference_pool": "pool"}
        )
        == 1
    )
    # an interactive request is never a victim: another one queues until a response ends
    high2 = asyncio.ensure_future(flow.pick(prep(rig, {"x-llm-d-inference-objective": "chat"})))
    await asyncio.sleep(0)
    rig.clock.advance(0.02)  # past the grace: the remaining batch request goes too
    flow.kick()
    d4, s4 = await asyncio.wait_for(high2, 1)
    assert isinstance(d4, Destination) and evicted == ["second", "first"]
    third = asyncio.ensure_future(flow.pick(prep(rig, {"x-llm-d-inference-objective": "chat"})))
    await asyncio.sleep(0)
    rig.clock.advance(1)
    flow.kick()
    assert not third.done() and flow.core.count == 1
    s3.response_finished()
    d5, s5 = await asyncio.wait_for(third, 1)
    assert isinstance(d5, Destination)
    for s in (s4, s5):
        s.response_finished()
    assert rig.learned.snapshot().inflight("10.0.0.1:8000").requests == 0


async def test_eviction_off_by_default_and_before_the_data_plane_listens() -> None:
    _, flow = rig_and_flow(config=EVICTING.replace("  enableEviction: true\n", "  maxRequests: 9\n"))
    assert flow.reclamation is None
    rig2, flow2 = rig_and_flow(config=EVICTING)
    _, s1 = await flow2.pick(prep(rig2, {"x-llm-d-inference-objective": "batch"}))
    _, s2 = await flow2.pick(prep(rig2, {"x-llm-d-inference-objective": "batch"}))
    high = asyncio.ensure_future(flow2.pick(prep(rig2, {"x-llm-d-inference-objective": "chat"})))
    await asyncio.sleep(0)
    fired: list[int] = []
    e2 = evictable(s2)
    assert e2 is not None
    e2.on_evict(lambda: fired.append(2))  # registered after the revocation: called at once
    assert fired == [2]
    s2.aborted("evicted")
    d, s3 = await asyncio.wait_for(high, 1)
    assert isinstance(d, Destination)
    for s in (s1, s3):
        s.response_finished()
