"""Test support for the gateway's integration tests: tiny real backends and a scriptable in-process picker.

Nothing here is a mock of the gateway: backends are real aiohttp servers on 127.0.0.1 (ports chosen by the
kernel), and the picker is a real :class:`inferoute.picking.Picker` implementation with scripted behaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from inferoute.endpoints import Endpoint
from inferoute.gateway.app import RunningGateway, start_gateway
from inferoute.gateway.config import GatewayConfig, parse_config
from inferoute.picking import Decision, Destination, PickerError, PickRequest, PickSession


class Backend:
    """A model-server stand-in. ``POST`` echoes what it received as JSON; ``"stream": true`` answers SSE.

    Paths: ``/status/<code>`` answers that status; ``.../sse?n=N&gap=S`` streams N events S seconds apart;
    ``.../slow?s=S`` waits S seconds before answering; ``.../upload`` signals ``first_bytes`` on arrival.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.requests: list[dict[str, Any]] = []
        self.disconnects = 0
        self.sse_started = asyncio.Event()
        self.first_bytes = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def key(self) -> str:
        return f"127.0.0.1:{self.port}"

    def endpoint(self) -> Endpoint:
        return Endpoint(self.name, "127.0.0.1", self.port)

    async def start(self) -> Backend:
        app = web.Application(client_max_size=200 * 1024 * 1024)
        app.router.add_route("*", "/status/{code}", self._status)
        app.router.add_route("*", "/{tail:.*}", self._echo)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _record(self, request: web.Request, body: bytes) -> dict[str, Any]:
        rec = {
            "method": request.method,
            "path": request.path_qs,
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "header_list": [(k.lower(), v) for k, v in request.headers.items()],
            "len": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
            "served_by": self.name,
        }
        self.requests.append(rec)
        return rec

    async def _status(self, request: web.Request) -> web.Response:
        body = await request.read()
        self._record(request, body)
        code = int(request.match_info["code"])
        return web.json_response({"served_by": self.name, "status": code}, status=code)

    async def _sse(self, request: web.Request) -> web.StreamResponse:
        self._record(request, b"")
        n = int(request.query.get("n", "5"))
        gap = float(request.query.get("gap", "0.05"))
        return await self._stream(request, n, gap)

    async def _stream(self, request: web.Request, n: int, gap: float) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        self.sse_started.set()
        try:
            for i in range(n):
                await resp.write(f"data: {json.dumps({'i': i, 'served_by': self.name})}\n\n".encode())
                await asyncio.sleep(gap)
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnects += 1
            raise
        return resp

    async def _upload(self, request: web.Request) -> web.Response:
        """Reads the body chunk by chunk and signals ``first_bytes`` as soon as any arrived."""
        parts = [await request.content.readany()]
        self.first_bytes.set()
        async for chunk in request.content.iter_any():
            parts.append(chunk)
        rec = self._record(request, b"".join(parts))
        return web.json_response({k: v for k, v in rec.items() if k != "header_list"})

    async def _echo(self, request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/sse"):
            return await self._sse(request)
        if request.path.endswith("/upload"):
            return await self._upload(request)
        if request.path.endswith("/slow"):
            await asyncio.sleep(float(request.query.get("s", "1")))
        body = await request.read()
        rec = self._record(request, body)
        try:
            doc = json.loads(body) if body else {}
        except ValueError:
            doc = {}
        if isinstance(doc, dict) and doc.get("stream"):
            return await self._stream(request, int(doc.get("n", 5)), float(doc.get("gap", 0.02)))
        out = {k: v for k, v in rec.items() if k != "header_list"}
        return web.json_response(out)


@dataclass
class ScriptedPicker:
    """A real :class:`Picker`: round robin over ``keys`` unless ``script`` decides otherwise."""

    keys: list[str]
    script: Callable[[PickRequest], Decision] | None = None
    error: PickerError | None = None
    delay: float = 0.0
    requests: list[PickRequest] = field(default_factory=list)
    sessions: list[RecordingSession] = field(default_factory=list)
    closed: bool = False
    _i: int = 0

    async def pick(self, request: PickRequest) -> tuple[Decision, PickSession]:
        self.requests.append(request)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        session = RecordingSession()
        self.sessions.append(session)
        if self.script is not None:
            return self.script(request), session
        i = self._i % len(self.keys)
        self._i += 1
        return Destination(tuple(self.keys[i:] + self.keys[:i])), session

    async def aclose(self) -> None:
        self.closed = True

    def ready(self) -> bool:
        return True


@dataclass
class RecordingSession:
    events: list[tuple[str, Any]] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    failed: list[tuple[str, str]] = field(default_factory=list)
    """(endpoint, reason) of each passive-health report (``endpoint_failed``)."""

    def endpoint_failed(self, endpoint: str, reason: str) -> None:
        self.failed.append((endpoint, reason))

    def response_started(self, served: str, status: int, headers: Mapping[str, str]) -> None:
        self.events.append(("started", (served, status)))

    def response_chunk(self, chunk: bytes) -> None:
        self.events.append(("chunk", len(chunk)))

    def response_finished(self) -> None:
        self.events.append(("finished", None))
        self.ended.set()

    def aborted(self, reason: str) -> None:
        self.events.append(("aborted", reason))
        self.ended.set()

    def kinds(self) -> list[str]:
        return [k for k, _ in self.events]


def gateway_config(backends: list[Backend], top: dict[str, Any] | None = None, **route: Any) -> GatewayConfig:
    """A one-route (``/``) config over ``backends`` with the embedded picker; ``route`` merges into the route,
    ``top`` into the top level."""
    r: dict[str, Any] = {"path": "/", "epp": {"endpoint": "embedded"}}
    for k, v in route.items():
        r[k] = {**r[k], **v} if isinstance(v, dict) and isinstance(r.get(k), dict) else v
    data: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "pool": {"endpoints": [{"name": b.name, "address": "127.0.0.1", "port": b.port} for b in backends]},
        "routes": [r],
    }
    data.update(top or {})
    return parse_config(data)


@contextlib.asynccontextmanager
async def running_gateway(
    cfg: GatewayConfig, picker: Any, registry: CollectorRegistry | None = None
) -> AsyncIterator[RunningGateway]:
    async def factory(_cfg: GatewayConfig, _eps: list[Endpoint], _reg: CollectorRegistry) -> Any:
        return picker

    gw = await start_gateway(cfg, registry=registry or CollectorRegistry(), embedded_factory=factory)
    try:
        yield gw
    finally:
        await gw.aclose(grace=1.0)


@contextlib.asynccontextmanager
async def backends(*names: str) -> AsyncIterator[list[Backend]]:
    started: list[Backend] = []
    try:
        for n in names:
            started.append(await Backend(n).start())
        yield started
    finally:
        for b in started:
            await b.aclose()


def metric_value(registry: CollectorRegistry, name: str, labels: Mapping[str, str] | None = None) -> float:
    v = registry.get_sample_value(name, dict(labels or {}))
    return 0.0 if v is None else v
