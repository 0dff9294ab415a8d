"""Stock NGINX (Debian's nginx) in front of the inferoute decider: routing, bodies, streaming, errors.

Each test starts real processes on free 127.0.0.1 ports: echo backends (aiohttp), the decider
(:func:`inferoute.gateway.nginx_decider.server.start_decider`, built exactly as the gateway builds its
route_table, with a scripted picker injected as the "embedded" picker), and an NGINX master running the
configuration that ``inferoute nginx-config`` prints. NGINX is stopped by pid at teardown.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from nginx_harness import EchoBackend, NginxFactory, NginxServer, listening_socket
from prometheus_client import CollectorRegistry

from inferoute.gateway.config import GatewayConfig, parse_config
from inferoute.gateway.nginx_decider.server import RunningDecider, start_decider
from inferoute.integrations.nginx import NginxOptions, render
from inferoute.picking import Destination, PickerError, PickRequest, Reject

MiB = 1024 * 1024
BODY_LIMIT = 32 * MiB
SMALL_LIMIT = 1000


# --- a scripted picker with in-flight accounting -----------------------------------------------------------


@dataclass
class Session:
    picker: ScriptedPicker
    first: str
    events: list[tuple[Any, ...]] = field(default_factory=list)
    ended: bool = False

    def _end(self) -> None:
        if not self.ended:
            self.ended = True
            self.picker.inflight[self.first] -= 1

    def response_started(self, served: str, status: int, headers: Mapping[str, str]) -> None:
        self.events.append(("started", served, status))

    def response_chunk(self, chunk: bytes) -> None:
        self.events.append(("chunk", len(chunk)))

    def response_finished(self) -> None:
        self.events.append(("finished",))
        self._end()

    def aborted(self, reason: str) -> None:
        self.events.append(("aborted", reason))
        self._end()


class ScriptedPicker:
    """Picks the endpoints named by the request header ``x-test-pick`` (comma-separated pool indexes);
    ``x-test-picker`` selects a failure: ``reject-429``, ``error``, ``timeout``, ``rewrite``."""

    def __init__(self, pool: Sequence[str]) -> None:
        self.pool = list(pool)
        self.inflight: Counter[str] = Counter()
        self.sessions: list[Session] = []
        self.requests: list[PickRequest] = []

    async def pick(self, request: PickRequest) -> tuple[Destination | Reject, Session]:
        self.requests.append(request)
        behavior = request.headers.get("x-test-picker", "")
        if behavior == "error":
            raise PickerError("scripted failure", cause="unavailable")
        if behavior == "timeout":
            raise PickerError("scripted timeout", timeout=True)
        if behavior == "slow":
            await asyncio.sleep(1.0)
        picks = [self.pool[int(i)] for i in request.headers.get("x-test-pick", "0").split(",")]
        session = Session(self, picks[0])
        self.sessions.append(session)
        self.inflight[picks[0]] += 1
        if behavior == "reject-429":
            body = (
                b'{"error":{"message":"too many requests","type":"rate_limit_error","param":null,"code":429}}'
            )
            return Reject(429, body, {"retry-after": "1"}, cause="flow-control"), session
        if behavior == "rewrite":
            return Destination(tuple(picks), body=b'{"model":"rewritten"}'), session
        return Destination(tuple(picks)), session

    async def aclose(self) -> None:
        return None


# --- the stack ---------------------------------------------------------------------------------------------


@dataclass
class Stack:
    nginx: NginxServer
    url: str
    backends: list[EchoBackend]
    dead: str
    picker: ScriptedPicker
    decider: RunningDecider

    async def wait_idle(self, within: float = 10.0) -> None:
        """Until every picker session has ended (the post_action reports arrived)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if all(s.ended for s in self.picker.sessions):
                return
            await asyncio.sleep(0.02)
        still = [s.events for s in self.picker.sessions if not s.ended]
        raise AssertionError(f"sessions still open: {still}\n{self.nginx.access_log('inference.log')}")


def gateway_config(backends: Sequence[EchoBackend], dead: str) -> GatewayConfig:
    host, _, port = dead.partition(":")
    endpoints = [{"name": f"b{i}", "address": "127.0.0.1", "port": b.port} for i, b in enumerate(backends)]
    endpoints.append({"name": "dead", "address": host, "port": int(port)})
    bbr = {"max_body_size": BODY_LIMIT}
    return parse_config(
        {
            "listen": "127.0.0.1:0",
            "pool": {"endpoints": endpoints},
            "routes": [
                {"path": "/v1/", "bbr": bbr, "epp": {"endpoint": "embedded"}},
                {
                    "path": "/open/",
                    "bbr": bbr,
                    "epp": {"endpoint": "embedded", "failure_mode_allow": True},
                    "default_upstream": backends[2].key,
                },
                {"path": "/small/", "bbr": {"max_body_size": SMALL_LIMIT}, "epp": {"endpoint": "embedded"}},
            ],
        }
    )


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[NginxFactory]:
    with NginxFactory(tmp_path) as factory:
        yield factory


@pytest.fixture
async def backends() -> AsyncIterator[list[EchoBackend]]:
    started = [await EchoBackend().start() for _ in range(3)]
    try:
        yield started
    finally:
        for b in started:
            await b.aclose()


@pytest.fixture(params=["post_action", "syslog"])
async def stack(
    backends: list[EchoBackend],
    nginx: NginxFactory,
    refused_port: Callable[[], int],
    request: pytest.FixtureRequest,
) -> AsyncIterator[Stack]:
    """The whole stack; every test using it runs with both completion-report transports."""
    sock = listening_socket()
    nginx_port = sock.getsockname()[1]
    dead = f"127.0.0.1:{refused_port()}"
    pool = [b.key for b in backends] + [dead]
    picker = ScriptedPicker(pool)

    async def factory(cfg: GatewayConfig, endpoints: Any, registry: CollectorRegistry) -> ScriptedPicker:
        return picker

    running = await start_decider(gateway_config(backends, dead), "127.0.0.1:0", embedded_factory=factory)
    try:
        conf = render(
            NginxOptions(
                decider=f"127.0.0.1:{running.port}",
                listen=f"127.0.0.1:{nginx_port}",
                locations=("/v1/", "/open/", "/small/"),
                max_body_size=BODY_LIMIT,
                retries=2,
                self_contained=True,
                worker_processes="1",
                report=request.param,
            )
        )
        server = await asyncio.to_thread(nginx, conf, [sock])
        yield Stack(server, f"http://127.0.0.1:{nginx_port}", backends, dead, picker, running)
    finally:
        sock.close()  # unless NGINX took it
        await running.aclose()


def chat(model: str = "m-7b", **extra: Any) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}).encode()


JSON = {"Content-Type": "application/json"}


# --- tests -------------------------------------------------------------------------------------------------


async def test_model_header_reaches_the_picked_backend(stack: Stack) -> None:
    async with aiohttp.ClientSession() as client:
        for index in (1, 0, 2, 1):
            async with client.post(
                f"{stack.url}/v1/chat/completions?x=1",
                data=chat("llama-3"),
                headers={**JSON, "x-test-pick": str(index)},
            ) as resp:
                assert resp.status == 200, await resp.text()
                got = await resp.json()
            backend = stack.backends[index]
            assert got["port"] == backend.port, "the request did not land where the picker routed"
            assert got["headers"]["x-gateway-model-name"] == "llama-3"
            assert got["headers"]["x-gateway-destination-endpoint"] == backend.key
            assert got["path"] == "/v1/chat/completions?x=1"
            assert got["headers"]["x-forwarded-for"] == "127.0.0.1"
            assert len(got["headers"]["x-request-id"]) == 32  # NGINX's $request_id, also in the access log
            assert got["sha256"] == hashlib.sha256(chat("llama-3")).hexdigest()
    # the picker saw the model BBR extracted
    assert [r.model for r in stack.picker.requests] == ["llama-3"] * 4
    await stack.wait_idle()
    assert sum(stack.picker.inflight.values()) == 0
    served = [s.events[0] for s in stack.picker.sessions]
    assert served == [("started", stack.backends[i].key, 200) for i in (1, 0, 2, 1)]
    log = stack.nginx.access_log("inference.log")
    assert 'model="llama-3"' in log and f'upstream="{stack.backends[2].key}"' in log


async def test_bodyless_get_is_routed_without_a_model_header(stack: Stack) -> None:
    async with (
        aiohttp.ClientSession() as client,
        client.get(
            f"{stack.url}/v1/models", headers={"x-test-pick": "2", "X-Gateway-Model-Name": "x"}
        ) as resp,
    ):
        assert resp.status == 200, await resp.text()
        got = await resp.json()
    assert got["method"] == "GET" and got["length"] == 0
    assert got["port"] == stack.backends[2].port
    assert (
        "x-gateway-model-name" not in got["headers"]
    )  # no body, no model: the client's value is dropped too
    assert stack.picker.requests[-1].model is None
    await stack.wait_idle()


async def test_client_routing_headers_are_ignored(stack: Stack) -> None:
    spoofed = {
        **JSON,
        "x-test-pick": "1",
        "X-Gateway-Model-Name": "spoofed-model",
        "X-Inference-Upstream": stack.backends[0].key,
        "X-Gateway-Destination-Endpoint": stack.backends[2].key,
        "X-Gateway-Destination-Endpoint-Served": stack.backends[2].key,
        "X-Inference-Model": "spoofed",
        "X-Accel-Redirect": "@inference",
    }
    async with (
        aiohttp.ClientSession() as client,
        client.post(f"{stack.url}/v1/completions", data=chat("real-model"), headers=spoofed) as resp,
    ):
        assert resp.status == 200
        got = await resp.json()
    assert got["port"] == stack.backends[1].port
    headers = got["headers"]
    assert headers["x-gateway-model-name"] == "real-model"
    assert headers["x-gateway-destination-endpoint"] == stack.backends[1].key
    assert "x-inference-upstream" not in headers
    assert "x-gateway-destination-endpoint-served" not in headers
    picked = stack.picker.requests[-1]
    assert picked.headers.get("x-gateway-model-name") == "real-model"
    assert "x-gateway-destination-endpoint" not in picked.headers
    assert "x-inference-upstream" not in picked.headers


async def test_decider_headers_never_reach_the_client(stack: Stack) -> None:
    async with aiohttp.ClientSession() as client:
        for path, hdrs in (
            ("/v1/chat/completions", {}),
            ("/v1/chat/completions", {"x-test-picker": "reject-429"}),
        ):
            async with client.post(f"{stack.url}{path}", data=chat(), headers={**JSON, **hdrs}) as resp:
                await resp.read()
                names = {k.lower() for k in resp.headers}
                assert not {n for n in names if n.startswith(("x-inference-", "x-accel-"))}, resp.headers
                assert resp.headers["Server"].startswith("nginx")


async def test_large_body_and_chunked_upload_arrive_byte_identical(stack: Stack) -> None:
    big = os.urandom(20 * MiB)
    async with aiohttp.ClientSession() as client:
        async with client.post(
            f"{stack.url}/v1/completions",
            data=io.BytesIO(big),
            headers={"Content-Type": "application/octet-stream"},
        ) as resp:
            assert resp.status == 200, await resp.text()
            got = await resp.json()
        assert got["length"] == len(big)
        assert got["sha256"] == hashlib.sha256(big).hexdigest()

        pieces = [chat("chunky")[:10], chat("chunky")[10:], b" " * 70_000]
        expected = b"".join(pieces)

        async def gen() -> AsyncIterator[bytes]:
            for p in pieces:
                yield p
                await asyncio.sleep(0.01)

        async with client.post(f"{stack.url}/v1/completions", data=gen(), headers=JSON) as resp:
            assert resp.status == 200, await resp.text()
            got = await resp.json()
        assert got["sha256"] == hashlib.sha256(expected).hexdigest()
        assert got["headers"]["x-gateway-model-name"] == "chunky"
    await stack.wait_idle()


async def test_sse_arrives_incrementally(stack: Stack) -> None:
    n, gap = 8, 0.15
    arrivals: list[float] = []
    async with aiohttp.ClientSession() as client:
        t0 = time.monotonic()
        async with client.post(
            f"{stack.url}/v1/sse?n={n}&gap={gap}", data=chat(stream=True), headers=JSON
        ) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            buf = b""
            async for chunk in resp.content.iter_any():
                buf += chunk
                while b"\n\n" in buf:
                    _, buf = buf.split(b"\n\n", 1)
                    arrivals.append(time.monotonic() - t0)
    assert len(arrivals) == n + 1
    # Streamed, not buffered: the first event is seen long before the last one was produced.
    assert arrivals[-1] - arrivals[0] >= (n - 2) * gap * 0.8, arrivals
    await stack.wait_idle()
    assert stack.picker.sessions[-1].events[-1] == ("finished",)


async def test_fallback_walks_to_the_next_endpoint_and_accounting_sees_it(stack: Stack) -> None:
    dead_index = len(stack.backends)
    async with aiohttp.ClientSession() as client:
        async with client.post(
            f"{stack.url}/v1/completions", data=chat(), headers={**JSON, "x-test-pick": f"{dead_index},2"}
        ) as resp:
            assert resp.status == 200, await resp.text()
            got = await resp.json()
        assert got["port"] == stack.backends[2].port
        assert got["headers"]["x-gateway-destination-endpoint"] == stack.backends[2].key

        # two refusals, then the second fallback answers
        async with client.post(
            f"{stack.url}/v1/completions",
            data=chat(),
            headers={**JSON, "x-test-pick": f"{dead_index},{dead_index},1"},
        ) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["port"] == stack.backends[1].port

        # every endpoint refuses: JSON 502, session aborted
        async with client.post(
            f"{stack.url}/v1/completions", data=chat(), headers={**JSON, "x-test-pick": f"{dead_index}"}
        ) as resp:
            assert resp.status == 502
            assert resp.content_type == "application/json"
            err = await resp.json()
        assert err["error"]["type"] == "bad_gateway_error"
    await stack.wait_idle()
    ok, ok2, failed = stack.picker.sessions[-3:]
    assert ok.events == [("started", stack.backends[2].key, 200), ("finished",)]
    assert ok2.events == [("started", stack.backends[1].key, 200), ("finished",)]
    assert failed.events == [("aborted", "upstream-error")]
    assert sum(stack.picker.inflight.values()) == 0


async def test_5xx_before_the_first_byte_moves_on_like_the_gateway(stack: Stack) -> None:
    failing = stack.backends[0]
    failing.fail_status = 503
    async with aiohttp.ClientSession() as client:
        async with client.post(
            f"{stack.url}/v1/completions", data=chat(), headers={**JSON, "x-test-pick": "0,1"}
        ) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["port"] == stack.backends[1].port
        # the last endpoint's own 5xx reaches the client unchanged
        async with client.post(
            f"{stack.url}/v1/completions", data=chat(), headers={**JSON, "x-test-pick": "0"}
        ) as resp:
            assert resp.status == 503
            assert (await resp.json())["error"]["message"] == f"backend {failing.port} failing"
    await stack.wait_idle()
    walked, direct = stack.picker.sessions[-2:]
    assert walked.events == [("started", stack.backends[1].key, 200), ("finished",)]
    assert direct.events == [("started", failing.key, 503), ("finished",)]


async def test_client_disconnect_mid_stream_releases_the_session(stack: Stack) -> None:
    async with aiohttp.ClientSession() as client:
        resp = await client.post(f"{stack.url}/v1/sse?n=40&gap=0.1", data=chat(stream=True), headers=JSON)
        assert resp.status == 200
        await resp.content.readuntil(b"\n\n")
        resp.close()  # drop the connection mid-stream
    await stack.wait_idle()
    assert stack.picker.sessions[-1].events[-1] == ("aborted", "incomplete")
    assert sum(stack.picker.inflight.values()) == 0


async def test_client_gone_while_the_picker_decides_ends_the_session(stack: Stack) -> None:
    async with aiohttp.ClientSession() as client:
        with pytest.raises(TimeoutError):
            async with client.post(
                f"{stack.url}/v1/completions",
                data=chat(),
                headers={**JSON, "x-test-picker": "slow"},
                timeout=aiohttp.ClientTimeout(total=0.1),
            ):
                pass
    for _ in range(250):  # the picker is still deciding: wait for its session
        if stack.picker.sessions:
            break
        await asyncio.sleep(0.02)
    await stack.wait_idle()
    assert stack.picker.sessions[-1].events == [("aborted", "client-disconnect")]
    assert sum(stack.picker.inflight.values()) == 0


async def test_errors_reach_the_client_as_json(stack: Stack) -> None:
    async def post(path: str, body: bytes, **headers: str) -> tuple[int, dict[str, Any], Mapping[str, str]]:
        async with (
            aiohttp.ClientSession() as client,
            client.post(f"{stack.url}{path}", data=io.BytesIO(body), headers={**JSON, **headers}) as resp,
        ):
            assert resp.content_type == "application/json", (resp.status, await resp.text())
            return resp.status, await resp.json(), resp.headers

    status, body, headers = await post("/v1/chat/completions", chat(), **{"x-test-picker": "reject-429"})
    assert (status, body["error"]["type"]) == (429, "rate_limit_error")
    assert headers.get("Retry-After") == "1"
    status, body, _ = await post("/v1/chat/completions", chat(), **{"x-test-picker": "error"})
    assert (status, body["error"]["code"]) == (502, 502)
    status, body, _ = await post("/v1/chat/completions", chat(), **{"x-test-picker": "timeout"})
    assert (status, body["error"]["type"]) == (504, "timeout_error")
    # the decider's own limit (route /small/) and NGINX's client_max_body_size both give JSON 413
    status, body, _ = await post("/small/completions", b"x" * (SMALL_LIMIT + 1))
    assert status == 413 and "exceeds" in body["error"]["message"]
    status, body, _ = await post("/v1/completions", b"x" * (BODY_LIMIT + 1))
    assert status == 413 and body["error"]["code"] == 413
    # a request aiohttp's parser refuses (duplicate Content-Type) still gets a JSON error
    async with (
        aiohttp.ClientSession() as client,
        client.post(
            f"{stack.url}/v1/completions",
            data=chat(),
            headers=[("Content-Type", "application/json"), ("Content-Type", "application/json")],
        ) as resp,
    ):
        assert (resp.status, resp.content_type) == (400, "application/json"), await resp.text()
        assert "Content-Type" in (await resp.json())["error"]["message"]
    # a request NGINX itself refuses (invalid Content-Length) gets NGINX's JSON 400
    host, _, port = stack.url.removeprefix("http://").partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head, raw
    assert json.loads(payload)["error"]["code"] == 400
    # internal paths are not reachable through NGINX
    status, body, _ = await post("/_inferoute/done", b"")
    assert status == 404
    # paths outside the routed locations: JSON, never NGINX's HTML page
    for path, expected in (("/no/such/path", 404), ("/", 404)):
        async with aiohttp.ClientSession() as client, client.get(f"{stack.url}{path}") as resp:
            assert (resp.status, resp.content_type) == (expected, "application/json"), await resp.text()
            assert (await resp.json())["error"]["code"] == expected
    await stack.wait_idle()
    assert sum(stack.picker.inflight.values()) == 0


async def test_picker_fail_open_uses_the_default_upstream(stack: Stack) -> None:
    async with (
        aiohttp.ClientSession() as client,
        client.post(
            f"{stack.url}/open/chat/completions", data=chat("m"), headers={**JSON, "x-test-picker": "error"}
        ) as resp,
    ):
        assert resp.status == 200, await resp.text()
        got = await resp.json()
    assert got["port"] == stack.backends[2].port
    assert got["headers"]["x-gateway-model-name"] == "m"


async def test_body_rewrite_is_relayed_by_the_decider(stack: Stack) -> None:
    async with (
        aiohttp.ClientSession() as client,
        client.post(
            f"{stack.url}/v1/chat/completions",
            data=chat("orig"),
            headers={**JSON, "x-test-picker": "rewrite"},
        ) as resp,
    ):
        assert resp.status == 200, await resp.text()
        got = await resp.json()
    assert got["sha256"] == hashlib.sha256(b'{"model":"rewritten"}').hexdigest()
    assert got["port"] == stack.backends[0].port
    session = stack.picker.sessions[-1]
    assert session.ended and session.events[-1] == ("finished",)
    assert session.events[0] == ("started", stack.backends[0].key, 200)


async def test_decider_down_fail_closed_and_fail_open(
    backends: list[EchoBackend], nginx: NginxFactory, refused_port: Callable[[], int]
) -> None:
    down = refused_port()
    closed_sock, open_sock = listening_socket(), listening_socket()
    closed_port, open_port = closed_sock.getsockname()[1], open_sock.getsockname()[1]
    common = dict(decider=f"127.0.0.1:{down}", self_contained=True, worker_processes="1")
    closed = render(NginxOptions(listen=f"127.0.0.1:{closed_port}", **common))  # type: ignore[arg-type]
    opened = render(
        NginxOptions(listen=f"127.0.0.1:{open_port}", default_upstream=backends[1].key, **common)  # type: ignore[arg-type]
    )
    await asyncio.to_thread(nginx, closed, [closed_sock])
    await asyncio.to_thread(nginx, opened, [open_sock])
    async with aiohttp.ClientSession() as client:
        async with client.post(
            f"http://127.0.0.1:{closed_port}/v1/completions", data=chat(), headers=JSON
        ) as resp:
            assert resp.status == 502
            assert (await resp.json())["error"]["message"] == "the inference decider is unavailable"
        async with client.post(
            f"http://127.0.0.1:{open_port}/v1/completions", data=chat(), headers=JSON
        ) as resp:
            assert resp.status == 200
            got = await resp.json()
    assert got["port"] == backends[1].port
    assert got["sha256"] == hashlib.sha256(chat()).hexdigest()


async def test_without_post_action_sessions_end_by_the_completion_timeout(
    backends: list[EchoBackend], nginx: NginxFactory, refused_port: Callable[[], int]
) -> None:
    sock = listening_socket()
    nginx_port = sock.getsockname()[1]
    dead = f"127.0.0.1:{refused_port()}"
    picker = ScriptedPicker([b.key for b in backends] + [dead])

    async def factory(cfg: GatewayConfig, endpoints: Any, registry: CollectorRegistry) -> ScriptedPicker:
        return picker

    running = await start_decider(
        gateway_config(backends, dead), "127.0.0.1:0", embedded_factory=factory, completion_timeout=0.3
    )
    try:
        conf = render(
            NginxOptions(
                decider=f"127.0.0.1:{running.port}",
                listen=f"127.0.0.1:{nginx_port}",
                accounting=False,
                self_contained=True,
                worker_processes="1",
            )
        )
        server = await asyncio.to_thread(nginx, conf, [sock])
        async with (
            aiohttp.ClientSession() as client,
            client.post(f"http://127.0.0.1:{nginx_port}/v1/completions", data=chat(), headers=JSON) as resp,
        ):
            assert resp.status == 200
        stack = Stack(server, f"http://127.0.0.1:{nginx_port}", backends, dead, picker, running)
        await stack.wait_idle(within=5.0)  # the sweeper runs every second
        assert picker.sessions[0].events == [("aborted", "completion-timeout")]
        assert sum(picker.inflight.values()) == 0
    finally:
        await running.aclose()


async def test_an_exception_in_the_decider_is_a_json_500_and_counted() -> None:
    from inferoute.gateway.nginx_decider.handler import NginxDecider
    from inferoute.gateway.nginx_decider.server import DeciderServer

    def broken_routes(path: str) -> None:
        raise RuntimeError("bug")

    registry = CollectorRegistry()
    server = DeciderServer(NginxDecider(broken_routes, registry=registry))
    port = await server.start()
    try:
        async with (
            aiohttp.ClientSession() as client,
            client.post(f"http://127.0.0.1:{port}/v1/completions", data=chat(), headers=JSON) as resp,
        ):
            assert (resp.status, resp.content_type) == (500, "application/json")
            body = await resp.json()
        assert body["error"]["message"] == "internal error in the inference decider"  # no traceback leaks
        errors = registry.get_sample_value(
            "inferoute_nginx_decider_errors_total", {"status": "500", "cause": "protocol"}
        )
        assert errors == 1.0
    finally:
        await server.aclose()


async def test_decider_timeout_gives_json_504_or_fails_open(
    backends: list[EchoBackend], nginx: NginxFactory
) -> None:
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read(-1)
        finally:
            writer.close()

    silent = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    silent_port = silent.sockets[0].getsockname()[1]
    closed_sock, open_sock = listening_socket(), listening_socket()
    closed_port, open_port = closed_sock.getsockname()[1], open_sock.getsockname()[1]
    common: dict[str, Any] = dict(
        decider=f"127.0.0.1:{silent_port}", decider_timeout=1.0, self_contained=True, worker_processes="1"
    )
    try:
        await asyncio.to_thread(
            nginx, render(NginxOptions(listen=f"127.0.0.1:{closed_port}", **common)), [closed_sock]
        )
        opened = NginxOptions(listen=f"127.0.0.1:{open_port}", default_upstream=backends[0].key, **common)
        await asyncio.to_thread(nginx, render(opened), [open_sock])
        async with aiohttp.ClientSession() as client:
            url = f"http://127.0.0.1:{closed_port}/v1/completions"
            async with client.post(url, data=chat(), headers=JSON) as resp:
                assert (resp.status, resp.content_type) == (504, "application/json")
                assert (await resp.json())["error"]["message"] == "the inference decider timed out"
            url = f"http://127.0.0.1:{open_port}/v1/completions"
            async with client.post(url, data=chat(), headers=JSON) as resp:
                assert resp.status == 200
                assert (await resp.json())["port"] == backends[0].port
    finally:
        silent.close()
        await silent.wait_closed()
