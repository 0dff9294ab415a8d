"""Answers cut in the middle, through the real gateway over loopback: each failure is classified by who
caused it (the client went away, the model server broke off, the gateway itself failed), counted under its
cause, logged in one line, and never handed to aiohttp (which would log an ERROR traceback per request)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from test_gw_support import (
    RecordingSession,
    ScriptedPicker,
    backends,
    gateway_config,
    metric_value,
    running_gateway,
)

from inferoute.picking import Destination, PickRequest

N = 8


def _errors(registry: CollectorRegistry, cause: str) -> float:
    return metric_value(registry, "inferoute_gateway_errors_total", {"cause": cause})


def _aiohttp_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("aiohttp")]


async def _cut_after_first_event(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = b'{"model": "m", "prompt": "hi", "stream": true, "n": 200, "gap": 0.01}'
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    while b"data: " not in await asyncio.wait_for(reader.readline(), 5):
        pass
    writer.transport.abort()  # RST: the client is gone mid-stream


async def test_clients_leaving_mid_stream_are_client_disconnects(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with backends("a") as (a,):
        registry = CollectorRegistry()
        picker = ScriptedPicker([a.key])
        async with running_gateway(gateway_config([a]), picker, registry) as gw:
            port = int(gw.url.rsplit(":", 1)[1])
            await asyncio.gather(*(_cut_after_first_event(port) for _ in range(N)))
            for s in picker.sessions:
                await asyncio.wait_for(s.ended.wait(), 5)
            assert _errors(registry, "client-disconnect") == N
            assert _errors(registry, "upstream-aborted") == 0 and _errors(registry, "internal") == 0
    assert [s.events[-1] for s in picker.sessions] == [("aborted", "client-disconnect")] * N
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not _aiohttp_records(caplog)
    access = [r.getMessage() for r in caplog.records if r.name == "inferoute.gateway.access"]
    assert len(access) == N and all("status=499" in m and "cause=client-disconnect" in m for m in access)


@dataclass
class BreakingUpstream:
    """A model server that starts a chunked answer, sends one chunk and closes the connection."""

    name: str = "broken"
    port: int = 0
    server: asyncio.Server | None = None

    @property
    def key(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> BreakingUpstream:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"b\r\ndata: one\n\n\r\n"
            )
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self


async def test_model_server_breaking_off_is_upstream_aborted(caplog: pytest.LogCaptureFixture) -> None:
    """The client sees a cut answer (not a complete one), one WARNING per request, no traceback."""
    caplog.set_level(logging.INFO)
    up = await BreakingUpstream().start()
    registry = CollectorRegistry()
    picker = ScriptedPicker([up.key])
    try:
        async with (
            running_gateway(gateway_config([up]), picker, registry) as gw,  # type: ignore[list-item]
            aiohttp.ClientSession() as s,
        ):
            for _ in range(N):
                async with s.post(gw.url + "/v1/completions", data=b'{"model": "m"}') as r:
                    assert r.status == 200
                    with pytest.raises(aiohttp.ClientPayloadError):
                        await r.read()
            assert _errors(registry, "upstream-aborted") == N
            assert _errors(registry, "client-disconnect") == 0 and _errors(registry, "internal") == 0
    finally:
        assert up.server is not None
        up.server.close()
    warnings = [r for r in caplog.records if r.name == "inferoute.gateway.relay"]
    assert len(warnings) == N and all("broke off" in r.getMessage() and not r.exc_info for r in warnings)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not _aiohttp_records(caplog)
    assert [s.events[-1] for s in picker.sessions] == [("aborted", "upstream-aborted")] * N


class _BrokenSession(RecordingSession):
    def response_chunk(self, chunk: bytes) -> None:
        raise RuntimeError("a bug in the response path")


async def test_a_gateway_bug_mid_answer_is_internal_with_one_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with backends("a") as (a,):
        registry = CollectorRegistry()
        sessions: list[_BrokenSession] = []

        class Picker(ScriptedPicker):
            async def pick(self, request: PickRequest) -> tuple[Destination, _BrokenSession]:  # type: ignore[override]
                sessions.append(_BrokenSession())
                return Destination((a.key,)), sessions[-1]

        async with (
            running_gateway(gateway_config([a]), Picker([a.key]), registry) as gw,
            aiohttp.ClientSession() as s,
        ):
            body = b'{"model": "m", "stream": true, "n": 3}'
            for _ in range(N):
                async with s.post(gw.url + "/v1/completions", data=body) as r:
                    assert r.status == 200
                    with pytest.raises(aiohttp.ClientPayloadError):
                        await r.read()
            assert _errors(registry, "internal") == N
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == N and all(r.name == "inferoute.gateway.app" and r.exc_info for r in errors)
    assert not _aiohttp_records(caplog)
