"""The cross-replica syncer (``inferoute.epp.sync``): one behaviour suite run over every backend -- in-process
(MemorySyncer), shared memory between workers (ShmSyncer) and a real redis-server (RedisSyncer) -- plus the
in-flight load it carries between pickers (SyncedLearnedState)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from inferoute.epp.learned import IDLE, Finished, FirstByte, Inflight, Started
from inferoute.epp.sync.inflight import SyncedLearnedState
from inferoute.epp.sync.redis_syncer import RedisSyncer
from inferoute.epp.sync.shm import HEADER, ShmSyncer, create_segment
from inferoute.epp.sync.syncer import MemoryHub, MemorySyncer, SnapshotSyncer, run_syncer
from redis_server import redis_server


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def ns(self) -> int:
        return int(self.t * 1e9)


@dataclass
class Trio:
    """Three replicas of one backend; ``expire`` makes every value published so far older than the ttl
    (None: the backend expires by its own clock, tested separately)."""

    a: SnapshotSyncer
    b: SnapshotSyncer
    c: SnapshotSyncer
    expire: Callable[[], None] | None

    async def sync_all(self) -> None:
        for s in (self.a, self.b, self.c, self.a, self.b):  # twice: everyone sees everyone's latest
            await s.sync()


@pytest.fixture(params=["memory", "shm", "redis"])
async def trio(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Trio]:
    clock = FakeClock()
    if request.param == "memory":
        hub = MemoryHub(clock)
        t = Trio(
            *(MemorySyncer(hub, n, ttl=1.0) for n in "abc"), expire=lambda: setattr(clock, "t", clock.t + 2)
        )
        yield t
    elif request.param == "shm":
        path = create_segment(3, 4096)
        try:
            t = Trio(
                *(ShmSyncer(path, i, 3, slot_bytes=4096, ttl=1.0, clock_ns=clock.ns) for i in range(3)),
                expire=lambda: setattr(clock, "t", clock.t + 2),
            )
            yield t
        finally:
            os.unlink(path)
    else:
        with redis_server(tmp_path) as url:
            t = Trio(*(RedisSyncer(url, replica=n, ttl=5.0) for n in "abc"), expire=None)
            yield t
    for s in (t.a, t.b, t.c):
        await s.aclose()


def total(values: list[object]) -> int:
    return sum(int(v) for v in values)  # type: ignore[call-overload]


async def test_get_aggregates_the_other_replicas_values(trio: Trio) -> None:
    trio.a.set("inflight", "e1", 3)
    trio.b.set("inflight", "e1", 4)
    trio.c.set("inflight", "e1", 5)
    trio.c.set("inflight", "e2", 7)
    await trio.sync_all()
    assert trio.a.get("inflight", "e1", total) == 9  # b + c, not a's own
    assert trio.b.get("inflight", "e1", total) == 8
    assert trio.a.get("inflight", "e2", total) == 7
    assert trio.c.get("inflight", "e2", total) == 0  # only c has e2
    assert trio.a.get("other-key", "e1", total) == 0
    assert [s.peers() for s in (trio.a, trio.b, trio.c)] == [2, 2, 2]


async def test_values_are_published_only_at_an_exchange(trio: Trio) -> None:
    trio.b.set("inflight", "e1", 4)
    await trio.sync_all()
    trio.b.set("inflight", "e1", 40)
    assert trio.a.get("inflight", "e1", total) == 4
    await trio.b.sync()
    await trio.a.sync()
    assert trio.a.get("inflight", "e1", total) == 40


async def test_delete_withdraws_a_value(trio: Trio) -> None:
    trio.b.set("inflight", "e1", 4)
    trio.b.set("inflight", "e2", 2)
    await trio.sync_all()
    trio.b.delete("inflight", "e1")
    trio.b.delete("inflight", "never-set")
    await trio.sync_all()
    assert trio.a.get("inflight", "e1", total) == 0
    assert trio.a.get("inflight", "e2", total) == 2


async def test_a_closed_replica_drops_out(trio: Trio) -> None:
    trio.b.set("inflight", "e1", 4)
    trio.c.set("inflight", "e1", 1)
    await trio.sync_all()
    await trio.b.aclose()
    await trio.a.sync()
    assert trio.a.get("inflight", "e1", total) == 1
    assert trio.a.peers() == 1


async def test_a_replica_that_stops_publishing_expires(trio: Trio) -> None:
    trio.b.set("inflight", "e1", 4)
    await trio.sync_all()
    if trio.expire is None:  # redis: the replica's key carries the ttl as its expiry (Redis's own clock)
        assert isinstance(trio.b, RedisSyncer)
        pttl = await trio.b._client.pttl(f"{trio.b.prefix}:b")
        assert 0 < pttl <= 5000
        await trio.b._client.delete(f"{trio.b.prefix}:b", f"{trio.b.prefix}:c")  # what the expiry does
    else:
        trio.expire()
    await trio.a.sync()
    assert trio.a.get("inflight", "e1", total) == 0
    assert trio.a.peers() == 0
    if isinstance(trio.a, RedisSyncer):  # expired names leave the member set
        assert await trio.a._client.smembers(f"{trio.a.prefix}:replicas") == {b"a"}


async def test_an_undecodable_table_is_ignored_and_reported_once(
    trio: Trio, caplog: pytest.LogCaptureFixture
) -> None:
    trio.b.set("inflight", "e1", 4)
    await trio.sync_all()
    original = trio.c.exchange

    async def garbage(_mine: bytes) -> object:
        return await original(b"\xc1")  # 0xc1: never valid msgpack

    trio.c.exchange = garbage  # type: ignore[method-assign]
    await trio.c.sync()
    with caplog.at_level(logging.WARNING):
        await trio.a.sync()
        await trio.a.sync()
    assert trio.a.get("inflight", "e1", total) == 4
    assert sum("undecodable" in r.message for r in caplog.records) == 1


async def test_shm_reader_skips_a_slot_being_written(tmp_path: Path) -> None:
    clock = FakeClock()
    path = create_segment(2, 4096)
    a = ShmSyncer(path, 0, 2, slot_bytes=4096, clock_ns=clock.ns)
    b = ShmSyncer(path, 1, 2, slot_bytes=4096, clock_ns=clock.ns)
    try:
        b.set("inflight", "e1", 4)
        await b.sync()
        await a.sync()
        assert a.get("inflight", "e1", total) == 4
        version, stamp, length = HEADER.unpack_from(b._map, 4096)
        HEADER.pack_into(b._map, 4096, version + 1, stamp, length)  # b is mid-write: odd version
        await a.sync()
        assert a.peers() == 0  # the torn slot is skipped (read again at the next exchange)
        HEADER.pack_into(b._map, 4096, version + 2, stamp, length)
        await a.sync()
        assert a.get("inflight", "e1", total) == 4
    finally:
        await a.aclose()
        await b.aclose()
        os.unlink(path)


async def test_shm_table_over_the_slot_publishes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    path = create_segment(2, 256)
    a = ShmSyncer(path, 0, 2, slot_bytes=256, clock_ns=clock.ns)
    b = ShmSyncer(path, 1, 2, slot_bytes=256, clock_ns=clock.ns)
    try:
        for i in range(50):
            b.set("inflight", f"endpoint-{i}", i)
        with caplog.at_level(logging.WARNING):
            await b.sync()
            await b.sync()
        await a.sync()
        assert a.get("inflight", "endpoint-3", total) == 0
        assert sum("over the slot" in r.message for r in caplog.records) == 1
    finally:
        await a.aclose()
        await b.aclose()
        os.unlink(path)


async def test_redis_unreachable_is_reported_and_peers_forgotten_after_the_ttl(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with redis_server(tmp_path) as url:
        clock = FakeClock()
        a = RedisSyncer(url, replica="a", ttl=1.0)
        b = RedisSyncer(url, replica="b", ttl=1.0)
        a.clock = clock
        a._last_ok = clock()
        b.set("inflight", "e1", 4)
        await b.sync()
        await a.sync()
        assert a.get("inflight", "e1", total) == 4
        await b.aclose()
    # redis-server is gone
    with pytest.raises(ConnectionError):
        await a.sync()
    assert a.get("inflight", "e1", total) == 4  # within the ttl: the last known values stand
    clock.t += 2
    with pytest.raises(ConnectionError):
        await a.sync()
    assert a.get("inflight", "e1", total) == 0
    await a.aclose()


async def test_run_syncer_logs_a_failure_streak_once(caplog: pytest.LogCaptureFixture) -> None:
    hub = MemoryHub(FakeClock())
    s = MemorySyncer(hub, "a")
    calls = {"n": 0}
    original = s.exchange

    async def flaky(mine: bytes) -> object:
        calls["n"] += 1
        if calls["n"] in (2, 3, 4):
            raise ConnectionError("down")
        if calls["n"] == 6:
            raise asyncio.CancelledError
        return await original(mine)

    s.exchange = flaky  # type: ignore[method-assign]
    supplied, failed = [], []
    with caplog.at_level(logging.INFO), pytest.raises(asyncio.CancelledError):
        await run_syncer(s, 0, lambda: supplied.append(1), failed=lambda: failed.append(1))
    assert len(supplied) == 6
    assert len(failed) == 3  # every failed exchange counts (the metric), though logged once
    assert sum("sync failed" in r.message for r in caplog.records) == 1
    assert sum("works again" in r.message for r in caplog.records) == 1
    assert "a" not in hub.tables  # closed: withdrawn


async def test_inflight_load_is_shared_between_pickers() -> None:
    hub = MemoryHub(FakeClock())
    a = SyncedLearnedState(MemorySyncer(hub, "a"))
    b = SyncedLearnedState(MemorySyncer(hub, "b"))
    a.apply([Started("e1", 100, 80), Started("e1", 50, 50)])
    b.apply([Started("e1", 10, 10)])
    old = b.snapshot()
    assert a.snapshot().inflight("e1").requests == 2  # own load at once, the peer's after an exchange

    async def exchange() -> None:
        for s in (a, b, a):
            s.supply()
            await s.syncer.sync()
            s.take_peers()
        b.take_peers()

    await exchange()
    assert b.snapshot().inflight("e1") == Inflight(3, 3, 140, 160)
    assert old.inflight("e1") == Inflight(1, 1, 10, 10)  # a view never changes
    assert a.snapshot().inflight("e1").requests == 3
    assert b.local.snapshot().inflight("e1").requests == 1
    a.apply([FirstByte("e1", 80)])
    b.apply([Finished("e1", 10, 10, started=False)])
    assert b.snapshot().inflight("e1").requests == 2  # own change shows at once
    await exchange()
    assert b.snapshot().inflight("e1") == Inflight(2, 1, 50, 150)
    a.apply([Finished("e1", 100, 80, started=True), Finished("e1", 50, 50, started=False)])
    await exchange()
    assert b.snapshot().inflight("e1") == IDLE
    assert a.syncer.mine() == {"inflight": {}}  # nothing in flight: nothing published
    b.apply([Started("e2", 5, 5)])
    await exchange()
    assert a.snapshot().inflight("e2").requests == 1
    b.forget_endpoints(["e2"])
    await exchange()
    assert a.snapshot().inflight("e2") == IDLE
