"""Fuzzing the sans-IO HTTP/2 core: frame sequences from real ext_proc exchanges (written by the ``h2``
library as a strict client, with Envoy-like HPACK), mutated by hypothesis, fed in random splits, with a
shell that answers, holds, releases and ends calls as the real one does.

Invariants after every case: ``receive_data``/``tick`` never raise; the core never has more open streams
than advertised; whatever it queued parses as whole HTTP/2 frames; its buffers stay within the limits.

Quick run (``make test``): the default profile (300 cases, a few seconds). The long run, >= 100,000 cases
(docs/security.md gives the figures):

    HYPOTHESIS_PROFILE=h2core-long .venv/bin/python -m pytest -q -p no:randomly tests/unit/test_h2core_fuzz.py
"""

from __future__ import annotations

import os
import random
import resource

import h2.config
import h2.connection
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inferoute.epp.serving.h2core import (
    CallEnded,
    CallStarted,
    ConnectionEnded,
    H2Core,
    InputEnded,
    Limits,
    MessageReceived,
)
from inferoute.extproc import messages as m

settings.register_profile(
    "h2core-quick", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "h2core-long",
    max_examples=100_000,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "h2core-quick")
LIMITS = Limits(
    max_concurrent_streams=8,
    max_resets_per_interval=20,
    max_no_reply_frames_per_interval=50,
    max_continuation_frames=3,
    stream_window=65535,
    connection_window=131072,
    max_message_bytes=32768,
    max_pending_stream_bytes=65536,
    max_pending_connection_bytes=131072,
)
REPLY = b"\x00\x00\x00\x00\x03abc" * 100
PATH = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"


def _exchange_frames(seed: int) -> list[bytes]:
    """One connection's client bytes, frame by frame: the preface, SETTINGS, then a few ext_proc calls."""
    rnd = random.Random(seed)
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    c.initiate_connection()
    out = [c.data_to_send()]
    for _ in range(rnd.randint(1, 3)):
        sid = c.get_next_available_stream_id()
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", PATH),
            (":authority", "epp"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        c.send_headers(sid, headers)
        out.append(c.data_to_send())
        body = b"x" * rnd.randint(0, 3000)
        msgs = [
            m.headers_request([(":method", "POST"), (":path", "/v1/completions")], end_of_stream=False),
            m.body_chunk_request(body, end_of_stream=True),
        ]
        wire = b"".join(
            b"\x00" + len(x).to_bytes(4, "big") + x for x in (y.SerializeToString() for y in msgs)
        )
        c.send_data(sid, wire, end_stream=rnd.random() < 0.7)
        out.append(c.data_to_send())
        if rnd.random() < 0.3:
            c.ping(b"12345678")
            out.append(c.data_to_send())
        if rnd.random() < 0.2:
            c.reset_stream(sid)
            out.append(c.data_to_send())
    return _split_frames(b"".join(out))


def _split_frames(data: bytes) -> list[bytes]:
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    frames, pos = [preface], len(preface)
    while pos + 9 <= len(data):
        n = int.from_bytes(data[pos : pos + 3], "big")
        frames.append(data[pos : pos + 9 + n])
        pos += 9 + n
    return frames


SEEDS = [_exchange_frames(i) for i in range(8)]


@st.composite
def mutated(draw: st.DrawFn) -> tuple[list[bytes], list[int]]:
    frames = list(SEEDS[draw(st.integers(0, len(SEEDS) - 1))])
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["flip", "dup", "drop", "swap", "retype", "resid", "relen", "insert"]))
        i = draw(st.integers(1, len(frames) - 1)) if len(frames) > 1 else 0
        f = bytearray(frames[i])
        if op == "flip" and f:
            j = draw(st.integers(0, len(f) - 1))
            f[j] ^= draw(st.integers(1, 255))
        elif op == "dup":
            frames.insert(i, bytes(f) * draw(st.integers(1, 40)))
        elif op == "drop" and len(frames) > 2:
            frames.pop(i)
            continue
        elif op == "swap" and len(frames) > 2:
            k = draw(st.integers(1, len(frames) - 1))
            frames[i], frames[k] = frames[k], frames[i]
            continue
        elif op == "retype" and len(f) >= 9:
            f[3] = draw(st.integers(0, 12))
            f[4] = draw(st.integers(0, 255))
        elif op == "resid" and len(f) >= 9:
            f[5:9] = draw(st.integers(0, 2**32 - 1)).to_bytes(4, "big")
        elif op == "relen" and len(f) >= 9:
            f[0:3] = draw(st.integers(0, 70000)).to_bytes(3, "big")
        elif op == "insert":
            frames.insert(i, draw(st.binary(max_size=64)))
            continue
        frames[i] = bytes(f)
    data = b"".join(frames)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    return [data], cuts


def _frames_ok(out: bytes) -> bool:
    pos = 0
    while pos < len(out):
        if len(out) - pos < 9:
            return False
        pos += 9 + int.from_bytes(out[pos : pos + 3], "big")
    return pos == len(out)


def _drive(data: bytes, cuts: list[int], choice: random.Random) -> None:
    core = H2Core(LIMITS, 0.0)
    now, prev, held = 0.0, 0, {}
    out = bytearray(b"".join(core.data_to_send()))
    for cut in [*cuts, len(data)]:
        events = core.receive_data(data[prev:cut])
        prev = cut
        for ev in events:
            if isinstance(ev, CallStarted):
                if choice.random() < 0.1:
                    core.end_call(ev.sid, 12, "unknown method")
            elif isinstance(ev, MessageReceived):
                sid, data = ev
                r = choice.random()
                if r < 0.3:
                    core.hold(sid, len(data) + 5)
                    held[sid] = held.get(sid, 0) + len(data) + 5
                elif r < 0.8:
                    core.send_messages(sid, [REPLY], len(REPLY))
                else:
                    core.end_call(sid, 0)
            elif isinstance(ev, InputEnded):
                if choice.random() < 0.7:
                    core.end_call(ev.sid, 0)
            elif isinstance(ev, CallEnded):
                held.pop(ev.sid, None)
            else:
                assert isinstance(ev, ConnectionEnded) and core.closed
        for sid, n in list(held.items()):
            if choice.random() < 0.5:
                core.release(sid, n)
                del held[sid]
        now += choice.random() * 3
        core.tick(now)
        out += b"".join(core.data_to_send())
        assert len(core.streams) <= LIMITS.max_concurrent_streams
        assert sum(len(s.pending) for s in core.streams.values()) <= LIMITS.max_pending_connection_bytes
        assert all(len(s.inbuf) <= LIMITS.max_message_bytes + 5 for s in core.streams.values())
    assert _frames_ok(bytes(out))


@settings(settings.get_profile(PROFILE))
@given(mutated(), st.integers(0, 2**32))
def test_mutated_exchanges_never_crash_the_core(case: tuple[list[bytes], list[int]], seed: int) -> None:
    (data,), cuts = case
    _drive(data, cuts, random.Random(seed))


def test_memory_stays_bounded_over_many_cases() -> None:
    """The same drive over 2,000 random cases: the peak RSS grows by less than 32 MB."""
    rnd = random.Random(7)
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for i in range(2000):
        frames = list(SEEDS[i % len(SEEDS)])
        for _ in range(rnd.randint(0, 4)):
            j = rnd.randrange(1, len(frames))
            f = bytearray(frames[j])
            if f:
                f[rnd.randrange(len(f))] ^= rnd.randrange(1, 256)
            frames[j] = bytes(f) * rnd.randint(1, 5)
        data = b"".join(frames)
        _drive(data, sorted(rnd.randrange(len(data) + 1) for _ in range(3)), rnd)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak0 < 32 * 1024
