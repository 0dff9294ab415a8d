"""The gateway through real sockets: routing, headers, streaming, limits, errors, health and metrics."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import shlex
import time

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from test_gw_support import ScriptedPicker, backends, gateway_config, metric_value, running_gateway

from inferoute.picking import Destination, PickerError, PickRequest, Reject

CHAT = {"model": "llama-3", "messages": [{"role": "user", "content": "hi"}]}


async def test_routes_sets_model_header_and_request_id(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="inferoute.gateway.access")
    async with backends("a", "b") as (a, b):
        picker = ScriptedPicker([a.key, b.key])
        async with running_gateway(gateway_config([a, b]), picker) as gw, aiohttp.ClientSession() as s:
            async with s.post(
                gw.url + "/v1/chat/completions?x=1", json=CHAT, headers={"X-Request-Id": "req-1"}
            ) as r:
                assert r.status == 200
                doc = await r.json()
                assert r.headers["x-request-id"] == "req-1"
            async with s.post(gw.url + "/v1/chat/completions", json=CHAT) as r2:
                doc2 = await r2.json()
                assert len(r2.headers["x-request-id"]) == 32  # generated
    assert {doc["served_by"], doc2["served_by"]} == {"a", "b"}  # round robin through the picker
    h = doc["headers"]
    assert h["x-gateway-model-name"] == "llama-3"
    assert h["x-request-id"] == "req-1"
    assert h["x-gateway-destination-endpoint"] == (a.key if doc["served_by"] == "a" else b.key)
    assert picker.requests[0].model == "llama-3" and picker.requests[0].path == "/v1/chat/completions?x=1"
    assert json.loads(picker.requests[0].body)["model"] == "llama-3"  # full-duplex: the picker saw the body
    assert picker.sessions[0].kinds()[0] == "started" and picker.sessions[0].kinds()[-1] == "finished"
    lines = [r.getMessage() for r in caplog.records if r.name == "inferoute.gateway.access"]
    assert any("model=llama-3" in ln and "status=200" in ln and "upstream=127.0.0.1:" in ln for ln in lines)


async def test_spoofed_routing_headers_are_stripped() -> None:
    async with backends("a") as (a,):
        picker = ScriptedPicker([a.key])
        spoof = {
            "x-gateway-destination-endpoint": "10.9.9.9:1",
            "X-Inference-Upstream": "10.9.9.9:2",
            "x-gateway-destination-endpoint-served": "10.9.9.9:3",
            "x-gateway-destination-endpoint-subset": "10.9.9.9:4",
            "X-Gateway-Model-Name": "spoofed-model",
        }
        async with (
            running_gateway(gateway_config([a]), picker) as gw,
            aiohttp.ClientSession() as s,
            s.post(gw.url + "/v1/completions", json=CHAT, headers=spoof) as r,
        ):
            assert r.status == 200
            doc = await r.json()
    seen = picker.requests[0].headers
    assert not any("10.9.9.9" in v for v in seen.values())
    assert seen["x-gateway-model-name"] == "llama-3"
    fwd = a.requests[0]["header_list"]
    assert not any("10.9.9.9" in v for _, v in fwd)
    assert [v for k, v in fwd if k == "x-gateway-model-name"] == ["llama-3"]
    assert doc["headers"]["x-gateway-destination-endpoint"] == a.key


async def test_bbr_default_model_rules() -> None:
    cfg = {"default_model": "dflt"}
    async with (
        backends("a") as (a,),
        running_gateway(gateway_config([a], bbr=cfg), ScriptedPicker([a.key])) as gw,
        aiohttp.ClientSession() as s,
    ):
        cases = [
            (b'{"messages": []}', "application/json"),
            (b'{"model": null}', "application/json"),
            (b'{"model": 7}', "application/json"),
            (b'{"model": "x",', "application/json"),
            (b'{"model": "x"}', "text/plain"),
        ]
        for body, ctype in cases:
            async with s.post(gw.url + "/v1/x", data=body, headers={"Content-Type": ctype}) as r:
                assert r.status == 200
        async with s.get(gw.url + "/v1/models") as r:
            assert r.status == 200
    models = [req["headers"].get("x-gateway-model-name") for req in a.requests]
    assert models == ["dflt"] * 5 + [None]  # body-less GET: no header at all


async def test_invalid_destination_is_refused_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    async with backends("a") as (a,):
        picker = ScriptedPicker([a.key], script=lambda req: Destination(("10.1.2.3:8000",)))
        async with (
            running_gateway(gateway_config([a]), picker) as gw,
            aiohttp.ClientSession() as s,
            s.post(gw.url + "/v1/chat/completions", json=CHAT) as r,
        ):
            assert r.status == 502
            err = (await r.json())["error"]
    assert "10.1.2.3:8000" in err["message"] and err["type"] == "bad_gateway_error"
    assert a.requests == []
    assert any("10.1.2.3:8000" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert picker.sessions[0].kinds() == ["aborted"]


async def test_allowed_cidr_destination_is_used() -> None:
    async with backends("a", "outside") as (a, outside):
        picker = ScriptedPicker([a.key], script=lambda req: Destination((outside.key,)))
        cfg = gateway_config(
            [a],
            top={
                "pool": {
                    "endpoints": [{"address": "127.0.0.1", "port": a.port}],
                    "allowed_cidrs": ["127.0.0.0/8"],
                }
            },
        )
        async with (
            running_gateway(cfg, picker) as gw,
            aiohttp.ClientSession() as s,
            s.post(gw.url + "/v1/chat/completions", json=CHAT) as r,
        ):
            assert r.status == 200
            assert (await r.json())["served_by"] == "outside"


@pytest.mark.parametrize("status", [429, 503])
async def test_picker_immediate_response_passes_through(status: int) -> None:
    body = json.dumps({"error": {"message": "shed", "type": "rate_limit_error", "code": status}}).encode()
    async with backends("a") as (a,):
        picker = ScriptedPicker([a.key], script=lambda req: Reject(status, body))
        async with (
            running_gateway(gateway_config([a]), picker) as gw,
            aiohttp.ClientSession() as s,
            s.post(gw.url + "/v1/chat/completions", json=CHAT) as r,
        ):
            assert r.status == status
            assert await r.read() == body
            assert r.headers["content-type"].startswith("application/json")
    assert a.requests == []
    assert picker.sessions[0].kinds() == ["aborted"]


@pytest.mark.parametrize(
    ("error", "status", "cause"),
    [
        (PickerError("connection refused", cause="unavailable"), 502, "unavailable"),
        (PickerError("certificate verify failed", cause="tls"), 502, "tls"),
        (PickerError("deadline", timeout=True), 504, "picker-timeout"),
    ],
)
async def test_picker_failure_fail_closed(error: PickerError, status: int, cause: str) -> None:
    reg = CollectorRegistry()
    async with backends("a") as (a,):
        picker = ScriptedPicker([a.key], error=error)
        async with (
            running_gateway(gateway_config([a]), picker, reg) as gw,
            aiohttp.ClientSession() as s,
            s.post(gw.url + "/v1/chat/completions", json=CHAT) as r,
        ):
            assert r.status == status
            assert (await r.json())["error"]["code"] == status
    assert a.requests == []
    assert metric_value(reg, "inferoute_gateway_errors_total", {"cause": cause}) == 1


async def test_picker_failure_fail_open_default_upstream_then_pool() -> None:
    reg = CollectorRegistry()
    async with backends("a", "b") as (a, b):
        picker = ScriptedPicker([a.key], error=PickerError("down", cause="unavailable"))
        cfg = gateway_config([a, b], epp={"failure_mode_allow": True}, default_upstream=b.key)
        async with running_gateway(cfg, picker, reg) as gw, aiohttp.ClientSession() as s:
            for _ in range(2):
                async with s.post(gw.url + "/v1/chat/completions", json=CHAT) as r:
                    assert r.status == 200
                    assert (await r.json())["served_by"] == "b"
        assert metric_value(reg, "inferoute_gateway_fail_open_total", {"route": "/"}) == 2
        cfg2 = gateway_config([a, b], epp={"failure_mode_allow": True})
        async with running_gateway(cfg2, picker) as gw, aiohttp.ClientSession() as s:
            served = set()
            for _ in range(4):
                async with s.post(gw.url + "/v1/chat/completions", json=CHAT) as r:
                    assert r.status == 200
                    served.add((await r.json())["served_by"])
        assert served == {"a", "b"}


async def test_fallback_walks_past_dead_and_5xx_endpoints(refused_port) -> None:  # type: ignore[no-untyped-def]
    reg = CollectorRegistry()
    dead = f"127.0.0.1:{refused_port()}"
    async with backends("a", "b") as (a, b):
        picker = ScriptedPicker([dead, a.key, b.key], script=lambda req: Destination((dead, a.key, b.key)))
        cfg = gateway_config(
            [a, b],
            top={
                "pool": {
                    "endpoints": [
                        {"address": "127.0.0.1", "port": int(dead.split(":")[1])},
                        {"address": "127.0.0.1", "port": a.port},
                        {"address": "127.0.0.1", "port": b.port},
                    ]
                }
            },
        )
        async with running_gateway(cfg, picker, reg) as gw, aiohttp.ClientSession() as s:
            async with s.post(gw.url + "/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200
                assert (await r.json())["served_by"] == "a"
            # a 5xx before the first byte moves on too; the last endpoint's 5xx is passed through
            async with s.post(gw.url + "/status/503", json=CHAT) as r:
                assert r.status == 503
                assert (await r.json())["served_by"] == "b"
    assert (
        metric_value(reg, "inferoute_gateway_upstream_fallbacks_total", {"route": "/", "reason": "connect"})
        == 2
    )
    assert (
        metric_value(reg, "inferoute_gateway_upstream_fallbacks_total", {"route": "/", "reason": "5xx"}) == 1
    )
    assert picker.sessions[0].events[0] == ("started", (a.key, 200))
    assert picker.sessions[1].events[0] == ("started", (b.key, 503))


async def test_all_endpoints_dead_is_502(refused_port) -> None:  # type: ignore[no-untyped-def]
    port = refused_port()
    picker = ScriptedPicker([f"127.0.0.1:{port}"])
    cfg = gateway_config([], top={"pool": {"endpoints": [{"address": "127.0.0.1", "port": port}]}})
    async with (
        running_gateway(cfg, picker) as gw,
        aiohttp.ClientSession() as s,
        s.post(gw.url + "/v1/chat/completions", json=CHAT) as r,
    ):
        assert r.status == 502
        assert (await r.json())["error"]["message"] == "no model server could be reached"
    assert picker.sessions[0].kinds() == ["aborted"]


async def test_sse_is_relayed_event_by_event() -> None:
    async with backends("a") as (a,):
        picker = ScriptedPicker([a.key])
        async with running_gateway(gateway_config([a]), picker) as gw, aiohttp.ClientSession() as s:
            body = {**CHAT, "stream": True, "n": 5, "gap": 0.15}
            arrivals: list[float] = []
            async with s.post(gw.url + "/v1/chat/completions", json=body) as r:
                assert r.headers["content-type"].startswith("text/event-stream")
                async for line in r.content:
                    if line.startswith(b"data:"):
                        arrivals.append(time.monotonic())
    assert len(arrivals) == 6
    # events arrive spread over the backend's pacing (~0.75 s), not in one burst at the end
    assert arrivals[-1] - arrivals[0] > 0.4
    assert arrivals[1] - arrivals[0] > 0.05
    kinds = picker.sessions[0].kinds()
    assert kinds[0] == "started" and kinds.count("chunk") >= 2 and kinds[-1] == "finished"


async def test_client_disconnect_mid_stream_cancels_upstream_and_session() -> None:
    reg = CollectorRegistry()
    async with backends("a") as (a,):
        picker = ScriptedPicker([a.key])
        async with running_gateway(gateway_config([a]), picker, reg) as gw:
            reader, writer = await asyncio.open_connection(gw.host, gw.port)
            payload = json.dumps({**CHAT, "stream": True, "n": 200, "gap": 0.02}).encode()
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
            )
            await writer.drain()
            first = await asyncio.wait_for(reader.read(4096), 10)
            assert b"200" in first.split(b"\r\n", 1)[0]
            writer.close()
            await writer.wait_closed()
            session = picker.sessions[0]
            await asyncio.wait_for(session.ended.wait(), 10)
            for _ in range(100):
                if a.disconnects:
                    break
                await asyncio.sleep(0.05)
    assert session.events[-1] == ("aborted", "client-disconnect")
    assert a.disconnects == 1  # the upstream request was cancelled, not left streaming
    assert metric_value(reg, "inferoute_gateway_errors_total", {"cause": "client-disconnect"}) == 1


async def test_body_limit_content_length_and_chunked() -> None:
    async with backends("a") as (a,):
        cfg = gateway_config([a], bbr={"max_body_size": 1000})
        async with running_gateway(cfg, ScriptedPicker([a.key])) as gw, aiohttp.ClientSession() as s:
            async with s.post(gw.url + "/v1/x", data=b"x" * 1001) as r:
                assert r.status == 413
                assert (await r.json())["error"]["type"] == "invalid_request_error"

            async def chunks():  # type: ignore[no-untyped-def]
                for _ in range(5):
                    yield b"y" * 300

            async with s.post(gw.url + "/v1/x", data=chunks()) as r:
                assert r.status == 413
            async with s.post(gw.url + "/v1/x", data=b"z" * 1000) as r:
                assert r.status == 200
    assert [req["len"] for req in a.requests] == [1000]


async def test_chunked_upload_arrives_intact() -> None:
    blob = b'{"model": "m1", "prompt": "' + b"p" * 300_000 + b'"}'

    async def chunks():  # type: ignore[no-untyped-def]
        for i in range(0, len(blob), 7000):
            yield blob[i : i + 7000]

    async with (
        backends("a") as (a,),
        running_gateway(gateway_config([a]), ScriptedPicker([a.key])) as gw,
        aiohttp.ClientSession() as s,
        s.post(gw.url + "/v1/completions", data=chunks(), headers={"Content-Type": "application/json"}) as r,
    ):
        assert r.status == 200
        doc = await r.json()
    assert doc["sha256"] == hashlib.sha256(blob).hexdigest()
    assert doc["headers"]["x-gateway-model-name"] == "m1"


async def test_fifty_megabyte_limit() -> None:
    limit = 50 * 1024 * 1024
    head = b'{"model": "big", "prompt": "'
    fill = limit - len(head) - 2
    at_limit = head + b"a" * fill + b'"}'
    assert len(at_limit) == limit
    async with backends("a") as (a,):
        cfg = gateway_config([a], bbr={"max_body_size": limit})
        async with running_gateway(cfg, ScriptedPicker([a.key])) as gw, aiohttp.ClientSession() as s:
            async with s.post(
                gw.url + "/v1/completions",
                data=io.BytesIO(at_limit),
                headers={"Content-Type": "application/json"},
            ) as r:
                assert r.status == 200
                doc = await r.json()
            async with s.post(gw.url + "/v1/completions", data=io.BytesIO(at_limit + b" ")) as r:
                assert r.status == 413
    assert doc["len"] == limit and doc["headers"]["x-gateway-model-name"] == "big"
    assert len(a.requests) == 1


async def test_limits_headers_concurrency_and_unknown_route() -> None:
    async with backends("a") as (a,):
        cfg = gateway_config(
            [a], path="/v1/", top={"limits": {"max_concurrent_requests": 1, "max_header_bytes": 2000}}
        )
        async with running_gateway(cfg, ScriptedPicker([a.key])) as gw, aiohttp.ClientSession() as s:
            async with s.get(gw.url + "/other") as r:
                assert r.status == 404
                assert (await r.json())["error"]["code"] == 404
            async with s.get(gw.url + "/v1/models", headers={"X-Big": "v" * 2500}) as r:
                assert r.status == 431
                assert "too large" in (await r.json())["error"]["message"]
            slow = asyncio.create_task(s.get(gw.url + "/v1/sse?n=3&gap=0.3"))
            await asyncio.wait_for(a.sse_started.wait(), 10)
            async with s.get(gw.url + "/v1/models") as r:
                assert r.status == 503
                assert r.headers["retry-after"] == "1"
                assert (await r.json())["error"]["type"] == "service_unavailable_error"
            resp = await slow
            await resp.read()
            resp.release()


async def test_health_ready_metrics() -> None:
    async with backends("a") as (a,):
        reg = CollectorRegistry()
        async with (
            running_gateway(gateway_config([a]), ScriptedPicker([a.key]), reg) as gw,
            aiohttp.ClientSession() as s,
        ):
            async with s.post(gw.url + "/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200
            async with s.get(gw.url + "/healthz") as r:
                assert r.status == 200
            async with s.get(gw.url + "/readyz") as r:
                assert r.status == 200
            async with s.get(gw.url + "/metrics") as r:
                text = await r.text()
    assert 'inferoute_gateway_requests_total{code="200",route="/"} 1.0' in text
    assert "inferoute_gateway_ttfb_seconds_bucket" in text
    assert "inferoute_gateway_picker_duration_seconds_count" in text
    assert "inferoute_gateway_bbr_duration_seconds_count" in text


async def test_picker_sees_headers_only_when_configured() -> None:
    async with backends("a") as (a,):
        picker = ScriptedPicker([a.key])
        cfg = gateway_config([a], epp={"body": "headers_only"})
        async with (
            running_gateway(cfg, picker) as gw,
            aiohttp.ClientSession() as s,
            s.post(gw.url + "/v1/chat/completions", json=CHAT) as r,
        ):
            assert r.status == 200
            assert (await r.json())["len"] > 0  # the upstream still gets the body
    req: PickRequest = picker.requests[0]
    assert req.body == b"" and req.model == "llama-3"


async def test_picker_header_mutation_and_body_replacement_are_applied() -> None:
    new_body = json.dumps({**CHAT, "model": "llama-3-lora"}).encode()
    async with backends("a") as (a,):
        picker = ScriptedPicker(
            [a.key],
            script=lambda req: Destination(
                (a.key,),
                set_headers={"x-picked-by": "test", "x-inference-upstream": "10.0.0.1:1"},
                body=new_body,
            ),
        )
        async with (
            running_gateway(gateway_config([a]), picker) as gw,
            aiohttp.ClientSession() as s,
            s.post(gw.url + "/v1/chat/completions", json=CHAT) as r,
        ):
            doc = await r.json()
    assert doc["headers"]["x-picked-by"] == "test"
    assert "x-inference-upstream" not in doc["headers"]  # a routing header is never taken from a mutation
    assert doc["sha256"] == hashlib.sha256(new_body).hexdigest()


async def test_expect_100_continue_is_answered_and_oversize_refused_up_front() -> None:
    async with backends("a") as (a,):
        cfg = gateway_config([a], bbr={"max_body_size": 100_000})
        async with running_gateway(cfg, ScriptedPicker([a.key])) as gw:
            body = json.dumps({"model": "m", "prompt": "x" * 50_000}).encode()
            reader, writer = await asyncio.open_connection(gw.host, gw.port)
            writer.write(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
            )
            await writer.drain()
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert interim.startswith(b"HTTP/1.1 100 Continue")
            writer.write(body)
            await writer.drain()
            final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert final.startswith(b"HTTP/1.1 200")
            writer.close()
            await writer.wait_closed()

            reader, writer = await asyncio.open_connection(gw.host, gw.port)
            writer.write(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                b"Content-Length: 200000\r\n\r\n"
            )
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 413")  # refused before the body was sent
            writer.close()
            await writer.wait_closed()
    assert [r["len"] for r in a.requests] == [len(body)]


async def test_access_log_cannot_be_forged_through_path_or_model(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="inferoute.gateway.access")
    async with (
        backends("a") as (a,),
        running_gateway(gateway_config([a]), ScriptedPicker([a.key])) as gw,
        aiohttp.ClientSession() as s,
    ):
        evil_model = 'x" status=200 upstream=1.2.3.4:1 method=GET'
        async with s.post(gw.url + "/v1/a%0Astatus=999", json={"model": evil_model}) as r:
            assert r.status == 404  # the test backend's router does not match a newline; relayed as is
        async with s.post(gw.url + "/v1/b", json={"model": "a\r\nx-injected: 1"}) as r:
            assert r.status == 400  # a model with CR/LF cannot become a header
            err = (await r.json())["error"]
            assert err["param"] == "model" and err["type"] == "invalid_request_error"
    lines = [r.getMessage() for r in caplog.records if r.name == "inferoute.gateway.access"]
    assert len(lines) == 2 and all("\n" not in ln for ln in lines)
    first = dict(tok.split("=", 1) for tok in shlex.split(lines[0]))  # a logfmt reader sees one field each
    assert first["status"] == "404" and first["model"] == evil_model and first["upstream"] == a.key
    assert first["path"] == "/v1/a%0Astatus=999"  # the path as matched and forwarded (still encoded)
    second = dict(tok.split("=", 1) for tok in shlex.split(lines[1]))
    assert second["status"] == "400" and second["cause"] == "bad-model"
    # the 404 came from the backend's router before its echo handler; the 400 never left the gateway
    assert a.requests == []


async def test_upstream_timeouts() -> None:
    reg = CollectorRegistry()
    async with backends("a") as (a,):
        cfg = gateway_config([a], top={"timeouts": {"response_headers": 0.3, "read_idle": 0.3}})
        async with running_gateway(cfg, ScriptedPicker([a.key]), reg) as gw, aiohttp.ClientSession() as s:
            t0 = time.monotonic()
            async with s.post(gw.url + "/v1/slow?s=3", json=CHAT) as r:
                assert r.status == 504
                assert (await r.json())["error"]["type"] == "timeout_error"
            assert time.monotonic() - t0 < 2.5
            # a stream that goes silent longer than read_idle is cut off: the client sees a truncated body
            async with s.get(gw.url + "/v1/sse?n=3&gap=1.5") as r:
                assert r.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):
                    await r.read()
    assert metric_value(reg, "inferoute_gateway_errors_total", {"cause": "upstream-timeout"}) == 1
    assert metric_value(reg, "inferoute_gateway_errors_total", {"cause": "upstream-aborted"}) == 1
