"""The gateway as an Endpoint Picker Protocol data plane: a real ext_proc gRPC server in front of a picker."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry
from test_gw_support import Backend, ScriptedPicker, backends, gateway_config, metric_value, running_gateway

from inferoute.epp.serving.server import EppServer, ServerOptions
from inferoute.picking import Destination, Reject

CHAT = {"model": "m-1", "messages": [{"role": "user", "content": "hello"}]}


@contextlib.asynccontextmanager
async def epp(picker: ScriptedPicker) -> AsyncIterator[str]:
    opts = ServerOptions(host="127.0.0.1", grpc_port=0, health_port=None, insecure=True)
    server = await EppServer.start(picker, opts, CollectorRegistry())  # type: ignore[arg-type]
    try:
        yield f"http://127.0.0.1:{server.grpc_port}"
    finally:
        await server.aclose(0)


def remote(bs: list[Backend], target: str, top: dict[str, Any] | None = None, **epp_keys: Any) -> Any:
    return gateway_config(bs, top=top, epp={"endpoint": target, "timeout_ms": 3000, **epp_keys})


async def test_full_duplex_decision_and_response_phase_over_grpc() -> None:
    async with backends("a", "b") as (a, b):
        picker = ScriptedPicker([b.key, a.key])
        async with epp(picker) as target:
            reg = CollectorRegistry()
            async with (
                running_gateway(remote([a, b], target), ScriptedPicker([]), reg) as gw,
                aiohttp.ClientSession() as s,
            ):
                async with s.post(
                    gw.url + "/v1/chat/completions", json={**CHAT, "stream": True, "n": 3}
                ) as r:
                    assert r.status == 200
                    text = await r.text()
                await asyncio.wait_for(picker.sessions[0].ended.wait(), 10)
    assert text.count("data: {") == 3 and '"served_by": "b"' in text
    req = picker.requests[0]
    assert json.loads(req.body)["model"] == "m-1"  # the body went over the stream (full duplex)
    assert req.headers.get("x-gateway-model-name") == "m-1"
    events = picker.sessions[0].events
    assert events[0] == ("started", (b.key, 200))  # served endpoint reported in the response phase
    assert ("chunk" in picker.sessions[0].kinds()) and events[-1] == ("finished", None)
    assert metric_value(reg, "inferoute_gateway_requests_total", {"route": "/", "code": "200"}) == 1


async def test_headers_only_mode_sends_no_body() -> None:
    async with backends("a") as (a,):
        picker = ScriptedPicker([a.key])
        async with (
            epp(picker) as target,
            running_gateway(remote([a], target, body="headers_only"), ScriptedPicker([])) as gw,
            aiohttp.ClientSession() as s,
            s.post(gw.url + "/v1/chat/completions", json=CHAT) as r,
        ):
            assert r.status == 200
            assert (await r.json())["len"] > 0
    assert picker.requests[0].body == b""
    assert picker.requests[0].headers.get("x-gateway-model-name") == "m-1"


async def test_fallback_list_from_the_picker_is_walked(refused_port: Any) -> None:
    dead_port = refused_port()
    async with backends("a") as (a,):
        picker = ScriptedPicker([], script=lambda req: Destination((f"127.0.0.1:{dead_port}", a.key)))
        pool = {
            "pool": {
                "endpoints": [
                    {"address": "127.0.0.1", "port": dead_port},
                    {"address": "127.0.0.1", "port": a.port},
                ]
            }
        }
        async with (
            epp(picker) as target,
            running_gateway(remote([a], target, top=pool), ScriptedPicker([])) as gw,
            aiohttp.ClientSession() as s,
            s.post(gw.url + "/v1/chat/completions", json=CHAT) as r,
        ):
            assert r.status == 200
            assert (await r.json())["served_by"] == "a"
            await asyncio.wait_for(picker.sessions[0].ended.wait(), 10)
    assert picker.sessions[0].events[0] == ("started", (a.key, 200))


async def test_immediate_response_status_and_body_reach_the_client() -> None:
    body = b'{"error":{"message":"pool saturated","type":"rate_limit_error","param":null,"code":429}}'
    async with backends("a") as (a,):
        picker = ScriptedPicker([], script=lambda req: Reject(429, body))
        async with (
            epp(picker) as target,
            running_gateway(remote([a], target), ScriptedPicker([])) as gw,
            aiohttp.ClientSession() as s,
            s.post(gw.url + "/v1/chat/completions", json=CHAT) as r,
        ):
            assert r.status == 429
            assert json.loads(await r.read())["error"]["message"] == "pool saturated"
    assert a.requests == []


async def test_picker_timeout_is_504_and_unreachable_is_502(refused_port: Any) -> None:
    async with backends("a") as (a,):
        slow = ScriptedPicker([a.key], delay=2.0)
        reg = CollectorRegistry()
        async with (
            epp(slow) as target,
            running_gateway(remote([a], target, timeout_ms=200), ScriptedPicker([]), reg) as gw,
            aiohttp.ClientSession() as s,
            s.post(gw.url + "/v1/chat/completions", json=CHAT) as r,
        ):
            assert r.status == 504
            assert (await r.json())["error"]["type"] == "timeout_error"
        assert metric_value(reg, "inferoute_gateway_errors_total", {"cause": "picker-timeout"}) == 1

        reg2 = CollectorRegistry()
        nowhere = f"http://127.0.0.1:{refused_port()}"
        async with (
            running_gateway(remote([a], nowhere), ScriptedPicker([]), reg2) as gw,
            aiohttp.ClientSession() as s,
            s.post(gw.url + "/v1/chat/completions", json=CHAT) as r,
        ):
            assert r.status == 502
            assert "picker" in (await r.json())["error"]["message"]
        assert metric_value(reg2, "inferoute_gateway_errors_total", {"cause": "unavailable"}) == 1

        # fail-open: the same unreachable picker, but the request still gets served by the pool
        async with (
            running_gateway(remote([a], nowhere, failure_mode_allow=True), ScriptedPicker([])) as gw,
            aiohttp.ClientSession() as s,
            s.post(gw.url + "/v1/chat/completions", json=CHAT) as r,
        ):
            assert r.status == 200
            assert (await r.json())["served_by"] == "a"
    assert len(a.requests) == 1
