"""The simulator's KV-event publisher: vLLM's ``ZmqEventPublisher``, a thin ZMQ shell.

* A PUB socket on ``endpoint`` (bound or connected as vLLM decides, see :mod:`inferoute.kvevents.config`)
  sends each batch as ``[topic, seq, payload]``, ``seq`` counting from 0. PUB never blocks: past ``hwm``
  queued messages ZMQ drops them, and a subscriber sees a gap in the sequence.
* The last ``buffer_steps`` batches stay in a :class:`ReplayRing`. A ROUTER socket on ``replay_endpoint``
  answers a DEALER's ``["", start_seq]`` with ``["", topic, seq, payload]`` for every buffered batch from
  ``start_seq`` on, then ``["", topic, END_SEQ, ""]`` (the post vLLM #45177 form llm-d's client requires).

Event building is not here: the engine (pure) produces the events of each step; the replica's timer callback
hands them to :meth:`KVEventPublisher.publish`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence

import zmq
import zmq.asyncio

from inferoute.kvevents.config import KVEventsConfig, binds
from inferoute.kvevents.wire import END_SEQ, KVEvent, encode_batch, parse_seq, seq_bytes
from inferoute.tasks import TaskSet

log = logging.getLogger(__name__)


class ReplayRing:
    """The last ``capacity`` batches as ``(seq, payload)``."""

    def __init__(self, capacity: int) -> None:
        self._items: deque[tuple[int, bytes]] = deque(maxlen=capacity)

    def append(self, seq: int, payload: bytes) -> None:
        self._items.append((seq, payload))

    def since(self, start: int) -> list[tuple[int, bytes]]:
        """Buffered batches with ``seq >= start`` (from the oldest kept when ``start`` fell out)."""
        return [item for item in self._items if item[0] >= start]


def replay_reply(topic: bytes, ring: ReplayRing, request: Sequence[bytes]) -> list[list[bytes]] | None:
    """The messages answering one ROUTER request ``[identity, "", start_seq]``; None when malformed."""
    if len(request) != 3 or request[1] != b"" or len(request[2]) != 8:
        return None
    ident = request[0]
    start = parse_seq(request[2])
    if start < 0:
        return None
    out = [[ident, b"", topic, seq_bytes(seq), payload] for seq, payload in ring.since(start)]
    out.append([ident, b"", topic, END_SEQ, b""])
    return out


def _open(sock: zmq.Socket[bytes] | zmq.asyncio.Socket, endpoint: str) -> str:
    if binds(endpoint):
        sock.bind(endpoint)
        last = sock.getsockopt(zmq.LAST_ENDPOINT)
        return last.decode() if isinstance(last, bytes) else str(last)
    sock.connect(endpoint)
    return endpoint


class KVEventPublisher:
    """One engine's (one data-parallel rank's) publisher. ``await start()``, ``publish(events)``,
    ``await aclose()``."""

    def __init__(self, config: KVEventsConfig, topic: str, dp_rank: int = 0, legacy: bool = False) -> None:
        self.config = config
        self.topic = topic.encode()
        self.dp_rank = dp_rank
        self.legacy = legacy
        self.seq = 0
        """The sequence number of the next batch."""
        self.ring = ReplayRing(config.buffer_steps)
        self._ctx = zmq.Context()
        self._actx = zmq.asyncio.Context()
        self._pub: zmq.Socket[bytes] | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._tasks = TaskSet("kv-events")
        self.endpoint = ""
        """The PUB address actually bound (a ``*`` port resolved)."""
        self.replay_endpoint: str | None = None
        self.dropped = 0

    async def start(self) -> None:
        cfg = self.config
        pub = self._pub = self._ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.SNDHWM, cfg.hwm)
        pub.setsockopt(zmq.LINGER, 0)
        self.endpoint = _open(pub, cfg.endpoint)
        if cfg.replay_endpoint:
            router = self._router = self._actx.socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 0)
            self.replay_endpoint = _open(router, cfg.replay_endpoint)
            self._tasks.spawn(self._serve_replay(router), name="kv-events-replay")

    def publish(self, events: Sequence[KVEvent]) -> None:
        """Send one batch (nothing when ``events`` is empty, as vLLM)."""
        if not events or self._pub is None:
            return
        payload = encode_batch(time.time(), events, self.dp_rank, legacy=self.legacy)
        seq = self.seq
        self.seq = seq + 1
        self.ring.append(seq, payload)
        try:
            self._pub.send_multipart([self.topic, seq_bytes(seq), payload], flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1

    async def _serve_replay(self, router: zmq.asyncio.Socket) -> None:
        while True:
            request = await router.recv_multipart()
            reply = replay_reply(self.topic, self.ring, request)
            if reply is None:
                log.debug("kv-events replay: malformed request of %d frames", len(request))
                continue
            for msg in reply:
                await router.send_multipart(msg)

    async def aclose(self) -> None:
        await self._tasks.aclose()
        for sock in (self._pub, self._router):
            if sock is not None:
                with contextlib.suppress(zmq.ZMQError):
                    sock.close(linger=0)
        self._pub = self._router = None
        self._ctx.term()
        self._actx.term()
