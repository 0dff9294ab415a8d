"""Prefix placements shared between picker replicas (``inferoute.epp.sync.placements``): each placement
reaches every peer exactly once, survives a peer exchanging out of step, starts over when a replica restarts,
stays bounded, and ignores what it cannot read. Then the two users: the approximate index of
``SyncedLearnedState`` and the precise producer's speculative entries."""

from __future__ import annotations

import pytest

from inferoute.clock import FakeClock
from inferoute.epp.learned import PrefixIndex
from inferoute.epp.learned.port import Placed, SharesPlacements
from inferoute.epp.plugin import Params, PluginDeps
from inferoute.epp.scheduling.plugins import precise_prefix_producer
from inferoute.epp.scheduling.plugins.precise_prefix_producer import PrecisePrefixProducer
from inferoute.epp.sync.inflight import GONE_SECONDS, SyncedLearnedState
from inferoute.epp.sync.placements import PlacementChannel
from inferoute.epp.sync.syncer import MemoryHub, MemorySyncer


class Replica:
    """One replica: a syncer and a channel whose sink records what the peers placed."""

    def __init__(self, hub: MemoryHub, name: str, **kw: int) -> None:
        self.syncer = MemorySyncer(hub, name, ttl=10.0)
        self.got: list[Placed] = []
        self.channel = PlacementChannel("prefix", self.got.extend, **kw)

    async def exchange(self) -> None:
        self.channel.supply(self.syncer)
        await self.syncer.sync()
        self.channel.take(self.syncer)


@pytest.fixture
def hub() -> MemoryHub:
    return MemoryHub(lambda: 0.0)


async def test_each_placement_reaches_every_peer_once(hub: MemoryHub) -> None:
    a, b, c = (Replica(hub, n) for n in "abc")
    a.channel.publish(Placed("e1", (1, 2, 3), 16))
    a.channel.publish(Placed("e2", (7,), 16))
    b.channel.publish(Placed("e3", (9, 8)))
    for _ in range(4):  # the entries stay published for KEEP exchanges: applied once all the same
        for r in (a, b, c):
            await r.exchange()
    assert b.got == [Placed("e1", (1, 2, 3), 16), Placed("e2", (7,), 16)]
    assert c.got == [Placed("e1", (1, 2, 3), 16), Placed("e2", (7,), 16), Placed("e3", (9, 8))]
    assert a.got == [Placed("e3", (9, 8))]  # never its own
    assert b.channel.received == 2 and c.channel.received == 3


async def test_a_peer_exchanging_less_often_still_gets_every_placement(hub: MemoryHub) -> None:
    a, b = Replica(hub, "a"), Replica(hub, "b")
    for i in range(6):
        a.channel.publish(Placed("e1", (i,)))
        await a.exchange()
        if i % 3 == 2:  # b exchanges every third time a does (KEEP = 3)
            await b.exchange()
    assert [p.keys for p in b.got] == [(i,) for i in range(6)]


async def test_a_placement_older_than_keep_exchanges_is_withdrawn(hub: MemoryHub) -> None:
    a, b = Replica(hub, "a", keep=2), Replica(hub, "b")
    a.channel.publish(Placed("e1", (1,)))
    for _ in range(3):
        await a.exchange()
    assert a.syncer.mine() == {"placed:prefix": {}}  # nothing fresh: nothing published
    await b.exchange()
    assert b.got == []


async def test_a_restarted_replica_starts_a_new_sequence(hub: MemoryHub) -> None:
    a, b = Replica(hub, "a"), Replica(hub, "b")
    a.channel.publish(Placed("e1", (1,)))
    a.channel.publish(Placed("e1", (2,)))
    await a.exchange()
    await b.exchange()
    again = Replica(hub, "a")  # same name, new process: sequence from 1 under a new epoch
    again.channel.publish(Placed("e2", (5,)))
    await again.exchange()
    await b.exchange()
    assert [p.keys for p in b.got] == [(1,), (2,), (5,)]


async def test_the_published_placements_stay_bounded(hub: MemoryHub) -> None:
    a, b = Replica(hub, "a", max_keys=10), Replica(hub, "b")
    for i in range(5):
        a.channel.publish(Placed("e1", tuple(range(i * 4, i * 4 + 4))))  # 4 keys each: 20 > 10
    a.channel.publish(Placed("e1", tuple(range(100, 130))))  # alone over the bound: cut to 10 keys
    await a.exchange()
    await b.exchange()
    assert [len(p.keys) for p in b.got] == [10]
    assert b.got[0].keys == tuple(range(100, 110))


async def test_unreadable_entries_are_ignored(hub: MemoryHub) -> None:
    b = Replica(hub, "b")
    other = MemorySyncer(hub, "old-version", ttl=10.0)
    other.set("placed:prefix", "old-version", "not a list")
    bad_entry = MemorySyncer(hub, "bad-entry", ttl=10.0)
    bad_entry.set("placed:prefix", "bad-entry", [1, [[1, "e1", ["x"], 16]]])
    good = MemorySyncer(hub, "good", ttl=10.0)
    good.set("placed:prefix", "good", [1, [[1, "e9", [4, 5], 16]]])
    for s in (other, bad_entry, good):
        await s.sync()
    await b.exchange()
    assert b.got == [Placed("e9", (4, 5), 16)]


async def test_the_approximate_index_learns_the_peers_decisions(hub: MemoryHub) -> None:
    a = SyncedLearnedState(MemorySyncer(hub, "a", ttl=10.0), PrefixIndex())
    b = SyncedLearnedState(MemorySyncer(hub, "b", ttl=10.0), PrefixIndex())
    a.apply([Placed("e1", (11, 12, 13), 16)])
    assert b.snapshot().match((11, 12, 13), ["e1", "e2"]) == {}
    for s in (a, b):
        s.supply()
        await s.syncer.sync()
        s.take_peers()
    assert b.snapshot().match((11, 12, 13, 14), ["e1", "e2"]) == {"e1": 3}
    assert a.placements.received == 0 and b.placements.received == 1


async def test_only_what_the_peers_cannot_know_is_published(hub: MemoryHub) -> None:
    a = SyncedLearnedState(MemorySyncer(hub, "a", ttl=10.0), PrefixIndex())
    a.apply([Placed("e1", (1, 2, 3), 16, known=3)])  # all three were held there already: no news
    a.apply([Placed("e1", (1, 2, 3, 4, 5), 16, known=3)])  # a longer prompt on the same prefix: its tail
    a.supply()
    assert a.syncer.mine()["placed:prefix"]["a"][1] == [[1, "e1", [4, 5], 16]]
    assert a.snapshot().match((1, 2, 3, 4, 5), ["e1"]) == {"e1": 5}  # the local index learns all of it


async def test_the_precise_producer_shares_its_speculative_entries(hub: MemoryHub) -> None:
    clock = FakeClock()
    states = [SyncedLearnedState(MemorySyncer(hub, n, ttl=10.0)) for n in "ab"]
    assert all(isinstance(s, SharesPlacements) for s in states)

    def producer(state: SyncedLearnedState, speculative: bool = True) -> PrecisePrefixProducer:
        params = Params({"speculativeIndexing": speculative}, "plugins[0].parameters")
        return precise_prefix_producer.create("precise", params, PluginDeps(learned=state, clock=clock))

    pa, pb = producer(states[0]), producer(states[1])
    keys = pa.index.keys_for(list(range(48)), "m")
    assert pa.share is not None
    pa.index.apply([Placed("e1", tuple(keys))])  # what on_picked does: own index first...
    pa.share(Placed("e1", tuple(keys)))  # ...then the peers
    assert pb.index.match(keys, ["e1"]) == {}
    for s in states:
        s.supply()
        await s.syncer.sync()
        s.take_peers()
    assert pb.index.match(keys, ["e1", "e2"]) == {"e1": 3}  # held speculatively on b too
    clock.advance(2.5)  # the speculative TTL (2 s) runs out there as well
    assert pb.index.match(keys, ["e1", "e2"]) == {}
    assert producer(states[1], speculative=False).share is None  # nothing to share without speculation


async def test_a_peer_publishing_too_much_is_applied_a_bounded_batch_per_exchange(hub: MemoryHub) -> None:
    b = Replica(hub, "b", max_keys=10)
    flood = MemorySyncer(hub, "flood", ttl=10.0)  # another version, or a fault: 100 entries of 4 keys
    flood.set("placed:prefix", "flood", [7, [[i, "e1", [i, i + 1, i + 2, i + 3], 16] for i in range(1, 101)]])
    await flood.sync()
    await b.exchange()
    assert [p.keys[0] for p in b.got] == [1, 2]  # 8 keys: a third entry would pass the bound of 10
    await b.exchange()
    assert [p.keys[0] for p in b.got] == [1, 2, 3, 4]  # the rest follows, the same bound each exchange


async def test_a_lagging_peer_does_not_bring_back_an_endpoint_this_picker_removed() -> None:
    clock = FakeClock()
    hub = MemoryHub(clock.now)
    a, b = (SyncedLearnedState(MemorySyncer(hub, n, ttl=100.0), PrefixIndex(), clock.now) for n in "ab")

    async def exchange() -> None:
        for s in (a, b):
            s.supply()
            await s.syncer.sync()
        for s in (a, b):
            s.take_peers()

    b.forget_endpoints(["gone"])  # b's pool lost it; a has not noticed yet and still places there
    a.apply([Placed("gone", (1, 2), 16), Placed("e1", (1, 2), 16)])
    await exchange()
    assert b.snapshot().match((1, 2), ["gone", "e1"]) == {"e1": 2}
    clock.advance(GONE_SECONDS + 1)  # long after: an endpoint of that address is a new pod
    a.apply([Placed("gone", (3, 4), 16)])
    await exchange()
    assert b.snapshot().match((3, 4), ["gone"]) == {"gone": 2}
    b.forget_endpoints(["e1"])
    b.apply([Placed("e1", (5,), 16)])  # b placed there itself: back in its pool, the peers count again
    a.apply([Placed("e1", (6, 7), 16)])
    await exchange()
    assert b.snapshot().match((6, 7), ["e1"]) == {"e1": 2}
