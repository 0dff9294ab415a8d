"""Request bodies at and just past the documented limits, through the real picker on loopback: nesting depth
(``MAX_JSON_DEPTH``) and model-name length (``MAX_MODEL_NAME_CHARS``).

Through the gateway with the embedded picker over simulated replicas, and through ``inferoute epp``'s
ext_proc server (the real picker, driven the way Envoy drives it). Exactly at a limit the request is served;
one over is a 400 with an OpenAI-style error body (gateway) or an ImmediateResponse 400 (ext_proc); 1,000
levels (small and past the 64 KiB simdjson threshold) likewise. No traceback is logged.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import aiohttp
import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc
from prometheus_client import CollectorRegistry

from inferoute.endpoints import Endpoint
from inferoute.epp.assembly import EppOptions, start_picker
from inferoute.epp.requestcontrol.parse import MAX_JSON_DEPTH, SIMD_MIN_BODY
from inferoute.epp.serving.server import EppServer, ServerOptions
from inferoute.extproc import messages as m
from inferoute.gateway.app import start_gateway
from inferoute.gateway.config import parse_config
from inferoute.picking import MAX_MODEL_NAME_CHARS
from inferoute.sim import SimConfig, SimPool

LONGEST = "m" * (MAX_MODEL_NAME_CHARS - 4) + "-8b!"
"""A model name exactly at the limit (the simulators serve it)."""


def nested(depth: int, model: str = LONGEST, pad: int = 0) -> bytes:
    """A request body whose arrays and objects nest ``depth`` levels (its own object is level 1)."""
    inner = "[" * (depth - 1) + "]" * (depth - 1)
    head = f'{{"model": "{model}", "prompt": "hi", "max_tokens": 1, "pad": "{"x" * pad}"'
    return f'{head}, "x": {inner}}}'.encode()


CASES: list[tuple[str, bytes, int, str]] = [
    ("depth at the limit", nested(MAX_JSON_DEPTH), 200, ""),
    ("depth one over", nested(MAX_JSON_DEPTH + 1), 400, f"deeper than {MAX_JSON_DEPTH} levels"),
    ("1000 levels", nested(1000), 400, f"deeper than {MAX_JSON_DEPTH} levels"),
    ("1000 levels, large body", nested(1000, pad=SIMD_MIN_BODY), 400, f"deeper than {MAX_JSON_DEPTH} levels"),
    ("large body at the limit", nested(MAX_JSON_DEPTH, pad=SIMD_MIN_BODY), 200, ""),
    ("model name at the limit", nested(2), 200, ""),
    ("model name one over", nested(2, model=LONGEST + "x"), 400, f"longer than {MAX_MODEL_NAME_CHARS}"),
]


def _no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    assert not [r for r in caplog.records if r.exc_info], "no traceback is logged"


async def test_limits_through_the_gateway(caplog: pytest.LogCaptureFixture) -> None:
    pool = await SimPool.start(
        SimConfig(model=LONGEST, time_scale=0.01, seed=1), replicas=1, host="127.0.0.1", base_port=0
    )
    registry = CollectorRegistry()
    cfg = parse_config(
        {
            "listen": "127.0.0.1:0",
            "pool": {"endpoints": [{"address": e.address, "port": e.port} for e in pool.endpoints]},
            "routes": [{"path": "/", "epp": {"endpoint": "embedded"}}],
        }
    )
    gw = await start_gateway(cfg, registry=registry)
    try:
        async with aiohttp.ClientSession() as s:
            for name, body, status, message in CASES:
                headers = {"Content-Type": "application/json"}
                async with s.post(gw.url + "/v1/completions", data=body, headers=headers) as r:
                    assert r.status == status, (name, await r.text())
                    answer = await r.json()
                if status == 200:
                    assert answer["model"] == LONGEST, name
                else:
                    error = answer["error"]
                    assert error["type"] == "invalid_request_error" and error["code"] == 400, name
                    assert message in error["message"], (name, error)
            errors = {
                cause: registry.get_sample_value("inferoute_gateway_errors_total", {"cause": cause})
                for cause in ("bad-request", "bad-model")
            }
    finally:
        await gw.aclose(grace=1.0)
        await pool.aclose()
    assert errors == {"bad-request": 3, "bad-model": 1}, "each 400 is counted by its cause"
    _no_tracebacks(caplog)


@pytest.fixture
async def epp_stub(
    refused_port: Callable[[], int],
) -> AsyncIterator[ext_grpc.ExternalProcessorStub]:
    """``inferoute epp``'s ext_proc server with the real picker (its endpoint refuses scrapes: it is picked
    blind, which is all a decision needs here)."""
    picker = await start_picker(
        EppOptions(endpoints=[Endpoint("a", "127.0.0.1", refused_port())], profile="round-robin")
    )
    opts = ServerOptions(host="127.0.0.1", grpc_port=0, health_port=None, insecure=True)
    server = await EppServer.start(picker, opts, CollectorRegistry())
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
            yield ext_grpc.ExternalProcessorStub(ch)
    finally:
        await server.aclose(0)
        await picker.aclose()


async def test_limits_over_ext_proc(
    epp_stub: ext_grpc.ExternalProcessorStub, caplog: pytest.LogCaptureFixture
) -> None:
    for name, body, status, message in CASES:
        head = m.headers_request(
            [(":method", "POST"), (":path", "/v1/completions"), (":authority", "gw")], end_of_stream=False
        )
        call = epp_stub.Process(iter([head, m.body_chunk_request(body, end_of_stream=True)]))
        reply = await asyncio.wait_for(call.read(), 10)
        call.cancel()
        if status == 200:
            assert reply.WhichOneof("response") == "request_headers", name
            continue
        assert reply.WhichOneof("response") == "immediate_response", name
        ir = reply.immediate_response
        error = json.loads(ir.body)["error"]
        assert ir.status.code == 400 and error["type"] == "invalid_request_error", name
        assert message in error["message"], (name, error)
    rewrite = [("x-gateway-model-name-rewrite", LONGEST + "x")]  # the rewrite target is bounded too
    head = m.headers_request(
        [(":method", "POST"), (":path", "/v1/completions"), *rewrite], end_of_stream=False
    )
    call = epp_stub.Process(iter([head, m.body_chunk_request(nested(2, model="a"), end_of_stream=True)]))
    reply = await asyncio.wait_for(call.read(), 10)
    call.cancel()
    assert reply.immediate_response.status.code == 400
    assert (
        f"longer than {MAX_MODEL_NAME_CHARS}" in json.loads(reply.immediate_response.body)["error"]["message"]
    )
    _no_tracebacks(caplog)
