"""Leader election on a Lease, the pure part (client-go's rules; an injected clock)."""

from __future__ import annotations

import datetime as dt

import pytest

from inferoute.clock import FakeClock
from inferoute.epp.ha import Election, HaOptions, LeaseRecord

WALL = dt.datetime(2026, 12, 4, tzinfo=dt.UTC)


def election(identity: str, clock: FakeClock) -> Election:
    return Election(HaOptions("pool-epp", "default", identity), clock)


def test_first_replica_creates_and_leads() -> None:
    clock = FakeClock()
    e = election("a", clock)
    e.observe(None)
    assert e.decide() == "create"
    rec = e.desired("create", WALL)
    assert (rec.holder, rec.duration, rec.transitions) == ("a", 2, 0)
    e.written(rec)
    assert e.is_leader()
    e.observe(rec)
    assert e.decide() == "renew"


def test_standby_waits_for_a_live_leader_and_takes_over_after_the_lease_duration() -> None:
    clock = FakeClock()
    b = election("b", clock)
    held = LeaseRecord("a", 2, 0, WALL, WALL, "1")
    b.observe(held)
    assert b.decide() == "wait" and not b.is_leader()
    clock.advance(1.5)
    renewed = LeaseRecord("a", 2, 0, WALL, WALL + dt.timedelta(seconds=1), "2")
    b.observe(renewed)  # the leader renewed: the standby's countdown restarts
    clock.advance(1.9)
    b.observe(renewed)
    assert b.decide() == "wait"
    clock.advance(0.2)  # 2.1 s without a change, by the standby's own clock
    b.observe(renewed)
    assert b.decide() == "acquire"
    taken = b.desired("acquire", WALL)
    assert (taken.holder, taken.transitions, taken.resource_version) == ("b", 1, "2")
    b.written(taken)
    assert b.is_leader()


def test_a_released_lease_is_taken_at_once() -> None:
    clock = FakeClock()
    b = election("b", clock)
    b.observe(LeaseRecord("", 1, 3, WALL, WALL, "7"))
    assert b.decide() == "acquire"


def test_a_leader_that_cannot_renew_steps_down_before_the_lease_expires() -> None:
    clock = FakeClock()
    a = election("a", clock)
    a.observe(None)
    a.written(a.desired("create", WALL))
    clock.advance(1.4)
    assert a.is_leader()
    clock.advance(0.2)  # 1.6 s since the last successful renewal > renew deadline 1.5 s
    assert not a.is_leader()


def test_timings_are_checked() -> None:
    assert HaOptions("l", "ns", "a").check() is None
    assert HaOptions("l", "ns", "a", lease_duration=1, renew_deadline=2).check() is not None


def test_a_standby_wakes_when_the_lease_expires_not_at_its_next_poll() -> None:
    clock = FakeClock()
    b = election("b", clock)  # retry period 0.5 s, lease 2 s
    b.observe(LeaseRecord("a", 2, 0, WALL, WALL, "1"))
    assert b.next_delay("wait") == 0.5
    clock.advance(1.8)
    b.observe(LeaseRecord("a", 2, 0, WALL, WALL, "1"))  # unchanged for 1.8 s
    assert b.next_delay("wait") == pytest.approx(0.2)  # the expiry, before the next 0.5 s tick
    clock.advance(0.2)
    assert b.decide() == "acquire"
    assert b.next_delay("acquire") == 0.5
    clock.advance(5)
    assert b.next_delay(None) == 0.5  # a failed round never retries at once (no busy loop)
    b.observe(LeaseRecord("", 1, 0, WALL, WALL, "2"))
    assert b.next_delay("wait") == 0.5
