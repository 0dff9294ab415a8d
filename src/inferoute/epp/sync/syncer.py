"""The cross-replica syncer: the shape of llm-d-router's ``CrossReplicaSyncer``, and the snapshot exchange
every backend here shares.

``set(key, endpoint, value)`` records this replica's value, ``get(key, endpoint, aggregate)`` folds the
other replicas' latest values with ``aggregate``, ``delete(key, endpoint)`` withdraws this replica's value.
All three are local and never block a pick; :meth:`SnapshotSyncer.sync` (run every ``interval`` by
:func:`run_syncer`) does the I/O: it publishes this replica's whole table (a msgpack map ``key -> endpoint ->
value``) and reads every live peer's. A replica that stops publishing for ``ttl`` seconds drops out of every
aggregate, so a killed replica's load is forgotten within ``ttl``.

Values are msgpack-able (numbers, tuples/lists of numbers, strings).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import msgspec

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 0.2
"""Seconds between exchanges (llm-d-router's ``dataLayer.crossReplicaSyncInterval`` default)."""

Table = dict[str, dict[str, Any]]
"""key -> endpoint -> value."""


class CrossReplicaSyncer(Protocol):
    replica: str

    def set(self, key: str, endpoint: str, value: Any) -> None:
        """This replica's ``value`` of ``key`` for ``endpoint`` (published at the next exchange)."""
        ...

    def get(self, key: str, endpoint: str, aggregate: Callable[[list[Any]], Any]) -> Any:
        """``aggregate`` of the other live replicas' values of ``key`` for ``endpoint`` (``[]``: none)."""
        ...

    def delete(self, key: str, endpoint: str) -> None:
        """Withdraw this replica's value of ``key`` for ``endpoint``."""
        ...

    def endpoints(self, key: str) -> list[str]:
        """The endpoints some other live replica has a value of ``key`` for."""
        ...

    def peers(self) -> int:
        """Live replicas other than this one, as of the last exchange."""
        ...

    async def sync(self) -> None:
        """One exchange: publish this replica's values, read the peers'."""
        ...

    async def aclose(self) -> None: ...


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(dict[str, dict[str, Any]]).decode


class SnapshotSyncer:
    """A :class:`CrossReplicaSyncer` whose exchange swaps whole tables; a backend implements
    :meth:`exchange` (publish our encoded table, return each live peer's)."""

    def __init__(self, replica: str, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        if ttl <= 0:
            raise ValueError("ttl must be > 0 seconds")
        self.replica = replica
        self.ttl = ttl
        self.clock = clock
        self._last_ok = clock()
        self._mine: Table = {}
        self._view: dict[str, dict[str, list[Any]]] = {}
        self._peers = 0
        self._bad: set[str] = set()

    def set(self, key: str, endpoint: str, value: Any) -> None:
        self._mine.setdefault(key, {})[endpoint] = value

    def delete(self, key: str, endpoint: str) -> None:
        table = self._mine.get(key)
        if table is not None:
            table.pop(endpoint, None)

    def get(self, key: str, endpoint: str, aggregate: Callable[[list[Any]], Any]) -> Any:
        return aggregate(self._view.get(key, {}).get(endpoint, []))

    def endpoints(self, key: str) -> list[str]:
        return list(self._view.get(key, ()))

    def peers(self) -> int:
        return self._peers

    def mine(self) -> Table:
        """This replica's table (a copy)."""
        return {k: dict(v) for k, v in self._mine.items()}

    async def sync(self) -> None:
        try:
            blobs = await self.exchange(_encode(self._mine))
        except BaseException:
            if self.clock() - self._last_ok > self.ttl:  # backend gone for ttl: so is what we knew of peers
                self._view, self._peers = {}, 0
            raise
        self._last_ok = self.clock()
        view: dict[str, dict[str, list[Any]]] = {}
        peers = 0
        for replica, blob in blobs.items():
            if replica == self.replica:
                continue
            try:
                table = _decode(blob)
            except msgspec.DecodeError:
                if replica not in self._bad:  # say it once per replica, not every 200 ms
                    self._bad.add(replica)
                    log.warning("cross-replica sync: replica %s published an undecodable table", replica)
                continue
            peers += 1
            for key, per_endpoint in table.items():
                slot = view.setdefault(key, {})
                for endpoint, value in per_endpoint.items():
                    slot.setdefault(endpoint, []).append(value)
        self._view, self._peers = view, peers

    async def exchange(self, mine: bytes) -> Mapping[str, bytes]:
        """Publish ``mine``; return ``{replica: table}`` of the live replicas (ours may be included)."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Withdraw this replica (backends override)."""


class MemoryHub:
    """In-process backing store for :class:`MemorySyncer` (tests; one process, several replicas), with an
    injectable clock."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.tables: dict[str, tuple[float, bytes]] = {}


class MemorySyncer(SnapshotSyncer):
    """Replicas in one process sharing a :class:`MemoryHub` (the reference's mock syncer, with expiry)."""

    def __init__(self, hub: MemoryHub, replica: str, ttl: float = 1.0) -> None:
        super().__init__(replica, ttl, hub.clock)
        self.hub = hub

    async def exchange(self, mine: bytes) -> Mapping[str, bytes]:
        now = self.hub.clock()
        self.hub.tables[self.replica] = (now, mine)
        return {r: blob for r, (at, blob) in self.hub.tables.items() if now - at <= self.ttl}

    async def aclose(self) -> None:
        self.hub.tables.pop(self.replica, None)


async def run_syncer(
    syncer: CrossReplicaSyncer,
    interval: float,
    before: Callable[[], None] = lambda: None,
    after: Callable[[], None] = lambda: None,
    failed: Callable[[], None] = lambda: None,
) -> None:
    """Every ``interval``: ``before()`` (supply this replica's values), one exchange, ``after()`` (apply the
    aggregates). A failed exchange calls ``failed()``, is logged (once per failure streak) and retried at the
    next tick; the aggregates keep their last values for ``ttl``, then count no peer until an exchange works
    again."""
    failing = False
    try:
        while True:
            before()
            try:
                await syncer.sync()
            except (OSError, ConnectionError, TimeoutError) as exc:
                failed()
                if not failing:
                    log.warning("cross-replica sync failed (retrying every %.2f s): %s", interval, exc)
                failing = True
            except Exception as exc:
                failed()
                if not failing:
                    log.exception("cross-replica sync failed (retrying every %.2f s): %s", interval, exc)
                failing = True
            else:
                if failing:
                    log.info("cross-replica sync works again")
                failing = False
                after()
            await asyncio.sleep(interval)
    finally:
        with contextlib.suppress(Exception):
            await syncer.aclose()
