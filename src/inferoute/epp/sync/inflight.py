"""In-flight load shared across picker workers and replicas (llm-d-router's ``inflight-load-producer``
contribution to its ``CrossReplicaSyncer``).

:class:`SyncedLearnedState` is a :class:`~inferoute.epp.learned.port.LearnedState`: the in-process state,
whose views add to each endpoint's local counts *the other replicas' latest published counts*. Every sync
interval it supplies its own counts (``set("inflight", endpoint, (requests, pending, pending_tokens,
tokens))``; endpoints back at zero are deleted) and takes the sum of the peers' values. Own records show at
once; the peers' part is at most one interval (200 ms by default) old. Prefix records go to the local store,
and its :class:`~inferoute.epp.learned.port.Placed` records also go to the peers through a
:class:`~inferoute.epp.sync.placements.PlacementChannel` (``placed:prefix``): every replica's approximate
index learns every replica's decisions. Other stores of placements (the precise index's speculative entries)
open their own channel with :meth:`SyncedLearnedState.placement_channel`.

A peer's placement on an endpoint this picker removed from its pool less than :data:`GONE_SECONDS` ago is
dropped (a peer that has not seen the removal yet still places there, and would re-add the endpoint to an
index that already forgot it: a leak in a pool whose pods come and go); once this picker places there itself
(the endpoint is back), the peers' placements on it count again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from inferoute.epp.learned import IDLE, Inflight, LearnedView, LocalLearnedState, PrefixStore, Record
from inferoute.epp.learned.port import Placed
from inferoute.epp.sync.placements import PlacementChannel, Sink
from inferoute.epp.sync.syncer import DEFAULT_INTERVAL, CrossReplicaSyncer, run_syncer

KEY = "inflight"
GONE_SECONDS = 60.0
"""How long the peers' placements on an endpoint this picker removed are dropped."""


def _sum(values: list[Any]) -> Inflight:
    r = p = pt = t = 0
    for v in values:
        try:
            a, b, c, d = v
            r, p, pt, t = r + int(a), p + int(b), pt + int(c), t + int(d)
        except (TypeError, ValueError):
            continue  # another version's value: ignore rather than fail every pick
    return Inflight(r, p, pt, t)


class SyncedView:
    """One cycle's view: the local view plus the peers' counts as of the last exchange (both immutable)."""

    __slots__ = ("_local", "_remote")

    def __init__(self, local: LearnedView, remote: Mapping[str, Inflight]) -> None:
        self._local = local
        self._remote = remote

    def inflight(self, endpoint: str) -> Inflight:
        mine = self._local.inflight(endpoint)
        peers = self._remote.get(endpoint)
        if peers is None:
            return mine
        return Inflight(
            mine.requests + peers.requests,
            mine.pending + peers.pending,
            mine.pending_tokens + peers.pending_tokens,
            mine.tokens + peers.tokens,
        )

    def match(self, keys: Sequence[int], endpoints: Iterable[str]) -> Mapping[str, int]:
        return self._local.match(keys, endpoints)

    def size(self) -> int:
        return self._local.size()

    def held_tokens(self, endpoint: str) -> int:
        return self._local.held_tokens(endpoint)


class SyncedLearnedState:
    """:class:`LocalLearnedState` plus the peers' in-flight counts from ``syncer``."""

    def __init__(
        self,
        syncer: CrossReplicaSyncer,
        prefix: PrefixStore | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.local = LocalLearnedState(prefix)
        self.clock = clock
        self._gone: dict[str, float] = {}
        """Endpoints removed from the pool -> when (the peers' placements on them are dropped for a while)."""
        self.prefix = self.local.prefix
        self.syncer = syncer
        self._remote: dict[str, Inflight] = {}
        """Replaced, never changed in place: views hold it."""
        self._published: set[str] = set()
        self.failures = 0
        """Exchanges that failed."""
        self._channels: list[PlacementChannel] = []
        self.placements = self._open("prefix", self.local.apply)
        """The approximate index's placements, shared with the peers."""

    def _open(self, name: str, sink: Sink) -> PlacementChannel:
        channel = PlacementChannel(name, self._live_only(sink))
        self._channels.append(channel)
        return channel

    def _live_only(self, sink: Sink) -> Sink:
        """``sink`` minus the placements on endpoints removed lately."""

        def apply(placed: Sequence[Placed]) -> None:
            if self._gone:
                cutoff = self.clock() - GONE_SECONDS
                self._gone = {ep: t for ep, t in self._gone.items() if t > cutoff}
                placed = [p for p in placed if p.endpoint not in self._gone]
            if placed:
                sink(placed)

        return apply

    def channels(self) -> list[PlacementChannel]:
        return list(self._channels)

    def placement_channel(self, name: str, sink: Sink) -> Callable[[Placed], None]:
        """Share another store's placements: returns what publishes one of ours; the peers' go to ``sink``."""
        publish = self._open(name, sink).publish

        def ours(placed: Placed) -> None:
            self._gone.pop(placed.endpoint, None)  # placed there: in the pool (again)
            publish(placed)

        return ours

    def snapshot(self) -> SyncedView:
        return SyncedView(self.local.snapshot(), self._remote)

    def apply(self, records: Iterable[Record]) -> None:
        batch = records if isinstance(records, (list, tuple)) else list(records)
        self.local.apply(batch)
        publish = self.placements.publish
        for r in batch:
            if isinstance(r, Placed):
                if self._gone:
                    self._gone.pop(r.endpoint, None)  # placed there: in the pool (again)
                publish(r)

    def forget_endpoints(self, endpoints: Iterable[str]) -> None:
        gone = list(endpoints)
        now = self.clock()
        for ep in gone:
            self._gone[ep] = now
        self.local.forget_endpoints(gone)
        self._remote = {ep: c for ep, c in self._remote.items() if ep not in gone}
        for ep in gone:
            self.syncer.delete(KEY, ep)
            self._published.discard(ep)

    def supply(self) -> None:
        """Publish this process's counts (before an exchange)."""
        view = self.local.snapshot()
        now: set[str] = set()
        for ep in self.local.endpoints():
            c = view.inflight(ep)
            if c != IDLE:
                self.syncer.set(KEY, ep, (c.requests, c.pending, c.pending_tokens, c.tokens))
                now.add(ep)
        for ep in self._published - now:
            self.syncer.delete(KEY, ep)
        self._published = now
        for channel in self._channels:
            channel.supply(self.syncer)

    def take_peers(self) -> None:
        """Take the peers' sums (after an exchange)."""
        remote: dict[str, Inflight] = {}
        for ep in self.syncer.endpoints(KEY):
            total = self.syncer.get(KEY, ep, _sum)
            if total != IDLE:
                remote[ep] = total
        self._remote = remote
        for channel in self._channels:
            channel.take(self.syncer)

    async def run(self, interval: float = DEFAULT_INTERVAL) -> None:
        """Sync every ``interval`` seconds until cancelled."""
        await run_syncer(self.syncer, interval, self.supply, self.take_peers, self._failed)

    def _failed(self) -> None:
        self.failures += 1

    def collector(self, pool: str) -> Collector:
        """The ``inferoute_epp_sync_*`` series, computed when the registry is collected."""
        return _SyncCollector(self, pool)


class _SyncCollector(Collector):
    def __init__(self, state: SyncedLearnedState, pool: str) -> None:
        self.state = state
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        state, pool = self.state, [self.pool]
        peers = GaugeMetricFamily(
            "inferoute_epp_sync_peers",
            "Other pickers (workers, replicas) heard from in the last exchange.",
            labels=["name"],
        )
        peers.add_metric(pool, state.syncer.peers())
        failures = CounterMetricFamily(
            "inferoute_epp_sync_exchange_failures",
            "Exchanges with the other pickers that failed (the shared store unreachable or too slow).",
            labels=["name"],
        )
        failures.add_metric(pool, state.failures)
        yield peers
        yield failures
        published = CounterMetricFamily(
            "inferoute_epp_sync_placements_published",
            "Prefix placements this picker published to the others, by channel.",
            labels=["name", "channel"],
        )
        received = CounterMetricFamily(
            "inferoute_epp_sync_placements_received",
            "Prefix placements learned from the other pickers, by channel.",
            labels=["name", "channel"],
        )
        for channel in state.channels():
            published.add_metric([self.pool, channel.name], channel.published)
            received.add_metric([self.pool, channel.name], channel.received)
        yield published
        yield received
