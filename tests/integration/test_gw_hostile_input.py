"""Path traversal through the gateway, over raw sockets (HTTP clients would normalise the path themselves):
with only ``/v1/`` routed, ``..`` and ``%2e%2e`` never reach the model server's admin paths, and an
absolute-form request line is routed by its path."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
from test_gw_support import ScriptedPicker, backends, gateway_config, running_gateway

BODY = b'{"model": "llama-3", "prompt": "hi"}'


async def _raw(port: int, target: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST {target} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(BODY)}\r\nConnection: close\r\n\r\n".encode()
        + BODY
    )
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def test_dot_segments_do_not_escape_the_route(caplog: pytest.LogCaptureFixture) -> None:
    async with backends("a") as (a,):
        picker = ScriptedPicker([a.key])
        async with running_gateway(gateway_config([a], path="/v1/"), picker) as gw:
            port = int(gw.url.rsplit(":", 1)[1])
            assert (await _raw(port, "/v1/../reset_prefix_cache"))[0] == 404  # resolved: no route
            status, body = await _raw(port, "/v1/%2e%2e/sleep")
            assert status == 400 and b"encoded dot" in body
            assert json.loads(body)["error"]["type"] == "invalid_request_error"
            assert (await _raw(port, "/v1/%2E%2e/%2e%2e/sleep"))[0] == 400
            assert (await _raw(port, "/v1/./completions"))[0] == 200
            assert (await _raw(port, "http://elsewhere.example/v1/completions?x=1"))[0] == 200
    assert [r["path"] for r in a.requests] == ["/v1/completions", "/v1/completions?x=1"]
    assert [r.path for r in picker.requests] == ["/v1/completions", "/v1/completions?x=1"]
    assert not [r for r in caplog.records if r.exc_info], (
        "no traceback (an absolute-form target was a 500 with one)"
    )


CONTROL = {
    "x-gateway-model-name-rewrite": "other-model",
    "x-llm-d-model-name-rewrite": "other-model",
    "x-gateway-model-name": "spoofed",
}


async def test_client_picker_control_headers_are_stripped_unless_trusted() -> None:
    async with backends("a") as (a,):
        picker = ScriptedPicker([a.key])
        async with (
            running_gateway(gateway_config([a]), picker) as gw,
            aiohttp.ClientSession() as s,
        ):
            json_headers = {**CONTROL, "Content-Type": "application/json"}
            async with s.post(gw.url + "/v1/completions", data=BODY, headers=json_headers) as r:
                assert r.status == 200
            async with s.get(gw.url + "/v1/models", headers=CONTROL) as r:  # body-less: no BBR header
                assert r.status == 200
        trusted = ScriptedPicker([a.key])
        async with (
            running_gateway(gateway_config([a], trust_client_headers=True), trusted) as gw,
            aiohttp.ClientSession() as s,
            s.get(gw.url + "/v1/models", headers=CONTROL) as r,
        ):
            assert r.status == 200
    for seen in (picker.requests[0].headers, picker.requests[1].headers):
        assert "x-gateway-model-name-rewrite" not in seen and "x-llm-d-model-name-rewrite" not in seen
    assert picker.requests[0].headers["x-gateway-model-name"] == "llama-3"  # set by BBR, not the client
    assert "x-gateway-model-name" not in picker.requests[1].headers
    assert "x-gateway-model-name" not in a.requests[1]["headers"]
    assert trusted.requests[0].headers["x-llm-d-model-name-rewrite"] == "other-model"


async def test_slow_body_gets_408_while_others_are_served() -> None:
    """Slowloris on the body: a client announcing 100 bytes and sending 10 is answered 408 after
    ``limits.body_read_timeout``; a well-behaved client alongside is answered at once."""
    async with backends("a") as (a,):
        cfg = gateway_config([a], top={"limits": {"body_read_timeout": 0.3}})
        async with running_gateway(cfg, ScriptedPicker([a.key])) as gw, aiohttp.ClientSession() as s:
            port = int(gw.url.rsplit(":", 1)[1])
            slow = []
            for _ in range(20):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(
                    b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 100\r\n\r\n0123456789"
                )
                slow.append((reader, writer))
            t0 = time.monotonic()
            async with s.post(gw.url + "/v1/completions", data=BODY) as r:
                assert r.status == 200
            assert time.monotonic() - t0 < 1.0
            for reader, writer in slow:
                head = await asyncio.wait_for(reader.readline(), 3)
                assert b" 408 " in head
                writer.close()
            assert time.monotonic() - t0 < 3.0
    assert len(a.requests) == 1
