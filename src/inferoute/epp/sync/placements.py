"""Prefix placements shared between picker replicas.

A picker learns where prefixes live from its own decisions: the approximate index entirely, the precise index
in its speculative entries (a server publishes a request's blocks only after prefilling it). With several
replicas each knows only its own decisions, so two replicas meeting a new prefix group place it on two
servers, and under KV pressure the copies evict each other. A :class:`PlacementChannel` publishes this
replica's recent :class:`~inferoute.epp.learned.port.Placed` records through the cross-replica syncer and
hands the peers' to a local sink, so every replica's index learns every replica's decisions, one exchange
late.

A placement carries only the keys the publisher did not already count as held there when it decided (the
tail of a prompt whose prefix is known: usually a question's few blocks), and none at all when every key
was known, so steady traffic on known prefixes costs the exchange next to nothing.

On the wire (inside the syncer's table): key ``placed:<channel>``, the publishing replica's name where the
in-flight table has an endpoint, value ``[epoch, [[seq, endpoint, keys, tokens_per_block], ...]]``. An entry
stays published for :data:`KEEP` exchanges, so a peer whose exchange falls between two of ours still sees
it; a peer applies only entries above the last ``seq`` it applied from that replica and ``epoch`` (a restarted
replica has a new epoch). At most :data:`MAX_KEYS` prefix keys are published at a time (about 100 KB of
msgpack); under heavier traffic the oldest entries go first, and the peers learn those the slow way (the
servers' KV events, or their own later picks). A peer applies at most as many keys from one replica per
exchange, whatever that replica publishes.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from inferoute.epp.learned.port import Placed
from inferoute.epp.sync.syncer import CrossReplicaSyncer

log = logging.getLogger(__name__)

KEY_PREFIX = "placed:"
KEEP = 3
"""Exchanges an entry stays published."""
MAX_KEYS = 12_000
"""Prefix keys published at most at a time (each 9 bytes of msgpack): fits a shared-memory slot."""

Sink = Callable[[Sequence[Placed]], None]


class PlacementChannel:
    """This replica's placements of one kind (``name``: ``prefix`` for the approximate index, ``precise``
    for speculative entries) out through the syncer, the peers' into ``sink``."""

    def __init__(self, name: str, sink: Sink, keep: int = KEEP, max_keys: int = MAX_KEYS) -> None:
        self.name = name
        self.key = KEY_PREFIX + name
        self.sink = sink
        self.keep = keep
        self.max_keys = max_keys
        self.epoch = random.getrandbits(62)
        self._seq = 0
        self._exchange = 0
        self._out: deque[tuple[int, list[Any]]] = deque()
        """(exchange it was published at, wire entry), oldest first."""
        self._out_keys = 0
        self._seen: dict[str, tuple[int, int]] = {}
        """peer replica -> (its epoch, the last seq applied)."""
        self.published = 0
        """This replica's placements queued for the peers."""
        self.received = 0
        """Placements applied from peers."""

    def publish(self, placed: Placed) -> None:
        """Queue one of this replica's placements for the next exchange: its keys past ``placed.known``
        (those the peers cannot know yet), if any."""
        if placed.known >= len(placed.keys):
            return
        self._seq += 1
        self.published += 1
        keys = list(placed.keys[placed.known : placed.known + self.max_keys])
        self._out.append((self._exchange, [self._seq, placed.endpoint, keys, placed.tokens_per_block]))
        self._out_keys += len(keys)
        while self._out_keys > self.max_keys:
            self._out_keys -= len(self._out.popleft()[1][2])

    def supply(self, syncer: CrossReplicaSyncer) -> None:
        """Publish what is still fresh (before an exchange)."""
        self._exchange += 1
        while self._out and self._out[0][0] <= self._exchange - self.keep - 1:
            self._out_keys -= len(self._out.popleft()[1][2])
        if self._out:
            syncer.set(self.key, syncer.replica, [self.epoch, [entry for _, entry in self._out]])
        else:
            syncer.delete(self.key, syncer.replica)

    def take(self, syncer: CrossReplicaSyncer) -> None:
        """Apply the peers' placements not applied yet (after an exchange)."""
        got: list[Placed] = []
        live: dict[str, tuple[int, int]] = {}
        for replica in syncer.endpoints(self.key):
            for value in syncer.get(self.key, replica, list):
                live[replica] = self._new_entries(replica, value, got)
        self._seen = live  # replicas gone quiet are forgotten: their rings were already empty
        if got:
            self.received += len(got)
            self.sink(got)

    def _new_entries(self, replica: str, value: Any, got: list[Placed]) -> tuple[int, int]:
        """Append ``replica``'s entries newer than the last applied to ``got``; return (epoch, last seq)."""
        try:
            raw_epoch, entries = value
            epoch = int(raw_epoch)
            seen_epoch, last = self._seen.get(replica, (epoch, 0))
            if seen_epoch != epoch:
                last = 0  # restarted: a new sequence
            top = last
            fresh: list[Placed] = []
            budget = self.max_keys  # what one peer may make us apply per exchange, whatever it publishes
            for seq, endpoint, keys, per_block in entries:
                n = int(seq)
                if n > last:
                    budget -= len(keys)
                    if budget < 0:
                        break  # the rest waits for the next exchange
                    fresh.append(Placed(str(endpoint), tuple(int(k) for k in keys), int(per_block)))
                    top = max(top, n)
        except (TypeError, ValueError):
            log.debug("cross-replica sync: ignoring an unreadable %s entry from %s", self.key, replica)
            return self._seen.get(replica, (0, 0))
        got.extend(fresh)
        return epoch, top
