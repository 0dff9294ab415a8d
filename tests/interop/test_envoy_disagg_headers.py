"""The disaggregation headers through real Envoy: the decode pod receives ``x-encoder-hosts-ports`` naming the
encoder for an image request, and a client's own ``x-encoder-hosts-ports`` / ``x-prefiller-host-port`` never
reach it (the picker replaces them with an empty value, which Envoy passes on)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from dataplanes import PLANES
from test_sched_handlers import EPD, IMAGE, chat

from inferoute.endpoints import Endpoint

ROLES = ("encode", "prefill", "decode")
SPOOF = "169.254.169.254:80"


@dataclass
class Pods:
    """Three stand-in model servers that record the headers of every POST (no /metrics: the picker then
    schedules over all of them)."""

    endpoints: list[Endpoint] = field(default_factory=list)
    seen: dict[str, list[dict[str, str]]] = field(default_factory=dict)


async def _answer(pods: Pods, request: web.Request) -> web.Response:
    if request.method != "POST":
        return web.Response(status=404)
    assert request.transport is not None
    port = request.transport.get_extra_info("sockname")[1]
    pods.seen.setdefault(f"127.0.0.1:{port}", []).append({k.lower(): v for k, v in request.headers.items()})
    body = await request.json()
    return web.json_response(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
    )


@pytest.fixture
async def pods() -> AsyncIterator[Pods]:
    p = Pods()
    runners = []
    try:
        for role in ROLES:
            app = web.Application()

            async def handle(request: web.Request) -> web.Response:
                return await _answer(p, request)

            app.router.add_route("*", "/{tail:.*}", handle)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            runners.append(runner)
            port = runner.addresses[0][1]
            p.endpoints.append(Endpoint(f"{role}-pod", "127.0.0.1", port, {"llm-d.ai/role": role}))
        yield p
    finally:
        for r in runners:
            await r.cleanup()


async def test_encoder_header_reaches_the_decode_pod_and_spoofed_ones_do_not(
    pods: Pods, tmp_path: Path
) -> None:
    key = {e.labels["llm-d.ai/role"]: e.key for e in pods.endpoints}
    spoofed = {"x-encoder-hosts-ports": SPOOF, "x-prefiller-host-port": SPOOF}
    async with PLANES["envoy"](pods, EPD, tmp_path) as (url, _), aiohttp.ClientSession() as http:  # type: ignore[arg-type]
        for body in (chat("what is this?", IMAGE), chat("hi")):
            async with http.post(
                url + "/v1/chat/completions",
                data=body,
                headers={"content-type": "application/json", **spoofed},
            ) as r:
                assert r.status == 200, await r.text()
                await r.read()
    assert set(pods.seen) == {key["decode"]}, pods.seen  # only the decode pod is sent the request
    image, text = pods.seen[key["decode"]]
    assert image["x-encoder-hosts-ports"] == key["encode"]
    # Envoy passes the picker's empty value on (the reference deletes the header; a sidecar reads both alike)
    assert text["x-encoder-hosts-ports"] == ""
    assert image["x-prefiller-host-port"] == text["x-prefiller-host-port"] == ""
