"""The KV-event consumer: one ZMQ subscriber per endpoint feeding the :class:`PreciseIndex`. A thin shell.

:class:`KVEventPool` follows the endpoint set (:meth:`KVEventPool.sync`, called whenever the picker's
endpoints change): a new endpoint gets a subscriber task, a removed one loses its task and its index
entries. Where an endpoint publishes comes from its labels (``kv-events-endpoint``,
``kv-events-replay-endpoint``: the simulator sets them) or, as llm-d's pod discovery, from its address and
``socketPort`` / ``replaySocketPort``.

Each :class:`EndpointSubscriber` connects a SUB socket, asks the replay socket for everything from batch 0
(the ring holds the engine's recent history) and again once the connection is up (what was published before
the subscription took effect), then applies live batches in sequence order; the decision for
each message is :class:`~inferoute.epp.precise.tracker.SeqTracker`'s. A gap triggers a replay from the first
missing batch; a sequence that goes backwards means the publisher restarted: the endpoint's entries are
dropped and rebuilt from batch 0. A restart can also hide behind a reconnection (the new publisher's first
batches are sent before the SUB socket reconnects, and its sequence may already be past ours): so whenever
ZMQ reports the connection lost, the first live message (or the reconnection, whichever comes first) is
preceded by a replay from the last batch applied, comparing that batch's bytes: a different batch, or none,
means a new publisher. A failed replay (timeout) is retried no sooner than ``replay_cooldown``
seconds later; meanwhile the gap is accepted and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

import xxhash
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from inferoute.endpoints import Endpoint
from inferoute.epp.learned.port import EngineEvents
from inferoute.epp.precise.index import PreciseIndex
from inferoute.epp.precise.tracker import Action, SeqTracker
from inferoute.kvevents.config import KV_EVENTS_LABEL, KV_REPLAY_LABEL
from inferoute.kvevents.wire import WireError, decode_batch, parse_seq, parse_topic, seq_bytes
from inferoute.tasks import TaskSet

log = logging.getLogger(__name__)

POLL_MS = 250
"""Wake at least this often (ms) to drain both sockets: ZMQ notifies edges, and an edge can be missed."""


@dataclass(frozen=True, slots=True)
class SubscriberSettings:
    topic_filter: str = "kv@"
    socket_port: int | None = None
    """Dial ``tcp://<endpoint address>:<socket_port>`` when the endpoint has no ``kv-events-endpoint``."""
    replay_socket_port: int | None = None
    replay_timeout: float = 10.0
    replay_cooldown: float = 5.0


@dataclass(slots=True)
class ConsumerStats:
    batches: int = 0
    replays: int = 0
    gaps: int = 0
    lost_batches: int = 0
    """Batches neither received live nor recovered by a replay."""
    restarts: int = 0
    invalid: int = 0


def _readable(sock: zmq.asyncio.Socket) -> bool:
    return bool(cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN)


def event_addresses(ep: Endpoint, settings: SubscriberSettings) -> tuple[str, str | None] | None:
    """(PUB address, replay address or None) of an endpoint, or None when it publishes nowhere known."""
    host = f"[{ep.address}]" if ":" in ep.address else ep.address
    pub = ep.labels.get(KV_EVENTS_LABEL)
    if pub is None and settings.socket_port is not None:
        pub = f"tcp://{host}:{settings.socket_port}"
    if pub is None:
        return None
    replay = ep.labels.get(KV_REPLAY_LABEL)
    if replay is None and settings.replay_socket_port is not None:
        replay = f"tcp://{host}:{settings.replay_socket_port}"
    return pub, replay


class EndpointSubscriber:
    """Consumes one endpoint's events into the shared index (see the module docstring)."""

    def __init__(
        self,
        key: str,
        pub: str,
        replay: str | None,
        index: PreciseIndex,
        ctx: zmq.asyncio.Context,
        settings: SubscriberSettings,
        stats: ConsumerStats,
    ) -> None:
        self.key = key
        self.pub = pub
        self.replay_endpoint = replay
        self.index = index
        self.tracker = SeqTracker()
        self._ctx = ctx
        self._settings = settings
        self.stats = stats
        self._no_replay_until = 0.0
        self._last_digest = 0
        """xxh64 of the payload of the batch ``tracker.last`` (to recognise it in a replay)."""
        self._suspect = False

    async def run(self) -> None:
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, self._settings.topic_filter.encode())
        sub.setsockopt(zmq.LINGER, 0)
        monitor = sub.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        sub.connect(self.pub)
        poller = zmq.asyncio.Poller()
        poller.register(sub, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        try:
            if self.replay_endpoint:
                await self.replay()
            while True:
                await poller.poll(timeout=POLL_MS)
                # ZMQ's notification is edge-triggered: drain both sockets before waiting again
                while _readable(monitor):
                    event = parse_monitor_message(await monitor.recv_multipart())
                    if event["event"] == zmq.EVENT_DISCONNECTED:
                        self._suspect = True  # whoever answers next may be a new publisher
                    elif self._suspect:
                        await self.verify()
                    else:  # (first) connection: what was published before the subscription took is replayed
                        await self.replay()
                while _readable(sub):
                    frames = await sub.recv_multipart()
                    if len(frames) != 3:
                        self.stats.invalid += 1
                        continue
                    await self.on_live(frames[0], frames[1], frames[2])
        finally:
            sub.disable_monitor()
            monitor.close(linger=0)
            sub.close(linger=0)

    async def verify(self) -> None:
        """After a lost connection: is the last applied batch still the publisher's? If not, it restarted."""
        self._suspect = False
        if not self.replay_endpoint or self.tracker.last < 0:
            return
        if await self.replay(start=self.tracker.last, expect=self._last_digest) is False:
            log.info("kv-events %s: reconnected to a new publisher", self.key)
            self._restarted(-1)
            await self.replay()

    def _restarted(self, seq: int) -> None:
        self.stats.restarts += 1
        self.index.clear(self.key)
        self.tracker.restart(seq)

    async def on_live(self, topic: bytes, seq_frame: bytes, payload: bytes) -> None:
        try:
            seq = parse_seq(seq_frame)
        except WireError:
            self.stats.invalid += 1
            return
        if self._suspect:
            await self.verify()
        action = self.tracker.on_live(seq)
        if action is Action.DUPLICATE:
            return
        if action is Action.RESTART:
            log.info("kv-events %s: sequence went back to %d: publisher restarted", self.key, seq)
            self._restarted(seq)
            if seq == 0:
                self.apply(topic, seq, payload)
                return
            action = Action.REPLAY
        if action is Action.REPLAY:
            self.stats.gaps += 1
            await self.replay()
            if seq <= self.tracker.last:
                return
            self.stats.lost_batches += seq - self.tracker.last - 1
        self.apply(topic, seq, payload)

    def apply(self, topic: bytes, seq: int, payload: bytes) -> None:
        try:
            batch = decode_batch(payload, seq, topic)
        except WireError as exc:
            log.debug("kv-events %s: batch %d: %s", self.key, seq, exc)
            self.stats.invalid += 1
        else:
            self.index.apply((EngineEvents(self.key, batch.events, parse_topic(topic)[1]),))
            self.stats.batches += 1
        self.tracker.applied(seq)
        self._last_digest = xxhash.xxh64_intdigest(payload)

    async def replay(self, start: int | None = None, expect: int | None = None) -> bool | None:
        """Ask for every buffered batch from ``start`` (the first one not applied); apply the new ones in
        order. With ``expect`` (a payload digest), the first batch must be batch ``start`` with that digest:
        False when it is not (a different publisher). None when no replay took place."""
        loop = asyncio.get_running_loop()
        if not self.replay_endpoint or loop.time() < self._no_replay_until:
            return None
        self.stats.replays += 1
        first = self.tracker.replay_from if start is None else start
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(self.replay_endpoint)
        try:
            await dealer.send_multipart([b"", seq_bytes(first)])
            async with asyncio.timeout(self._settings.replay_timeout):
                while True:
                    msg = await dealer.recv_multipart()
                    if len(msg) != 4 or msg[0] != b"":
                        self.stats.invalid += 1
                        continue
                    seq = parse_seq(msg[2])
                    if expect is not None:
                        if seq != first or xxhash.xxh64_intdigest(msg[3]) != expect:
                            return False
                        expect = None
                    if seq < 0:
                        return True
                    if seq > self.tracker.last:
                        self.stats.lost_batches += seq - self.tracker.last - 1
                        self.apply(msg[1], seq, msg[3])
        except (TimeoutError, WireError) as exc:
            log.warning("kv-events %s: replay from %s failed: %r", self.key, self.replay_endpoint, exc)
            self._no_replay_until = loop.time() + self._settings.replay_cooldown
        finally:
            dealer.close(linger=0)
        return None


class KVEventPool:
    """One subscriber task per publishing endpoint, following the endpoint set."""

    def __init__(self, index: PreciseIndex, settings: SubscriberSettings | None = None) -> None:
        self.index = index
        self.settings = settings or SubscriberSettings()
        self.stats = ConsumerStats()
        self._ctx: zmq.asyncio.Context | None = None
        self._subs: dict[str, tuple[EndpointSubscriber, asyncio.Task[None]]] = {}
        self._tasks = TaskSet("kv-events-consumer")

    @property
    def subscribers(self) -> dict[str, EndpointSubscriber]:
        return {k: s for k, (s, _) in self._subs.items()}

    def sync(self, endpoints: Iterable[Endpoint]) -> None:
        """Start subscribers for new publishing endpoints, stop and forget removed ones."""
        if self._ctx is None:
            self._ctx = zmq.asyncio.Context()
        wanted: dict[str, tuple[str, str | None]] = {}
        for ep in endpoints:
            addrs = event_addresses(ep, self.settings)
            if addrs is not None:
                wanted[ep.key] = addrs
        for key in list(self._subs):
            sub, task = self._subs[key]
            if wanted.get(key) != (sub.pub, sub.replay_endpoint):
                task.cancel()
                del self._subs[key]
                self.index.clear(key)
        for key, (pub, replay) in wanted.items():
            if key not in self._subs:
                sub = EndpointSubscriber(key, pub, replay, self.index, self._ctx, self.settings, self.stats)
                self._subs[key] = (sub, self._tasks.spawn(sub.run(), name=f"kv-events {key}"))

    async def aclose(self) -> None:
        self._subs.clear()
        await self._tasks.aclose()
        if self._ctx is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._ctx.term()
            self._ctx = None
