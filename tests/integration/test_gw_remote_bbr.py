"""Remote body-based routing (seed 000): the body streamed over ext_proc to a real BBR gRPC server."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry
from test_gw_support import ScriptedPicker, backends, gateway_config, metric_value, running_gateway

from inferoute.extproc.bbr_server import start_bbr_server


async def test_model_header_comes_from_the_remote_bbr() -> None:
    bbr = await start_bbr_server()
    try:
        async with backends("a") as (a,):
            picker = ScriptedPicker([a.key])
            cfg = gateway_config(
                [a],
                bbr={
                    "endpoint": f"127.0.0.1:{bbr.port}",
                    "chunk_size": 4096,
                    "timeout_ms": 5000,
                    "default_model": "dflt",
                },
            )
            big = {"model": "remote-m", "prompt": "p" * 300_000}
            async with running_gateway(cfg, picker) as gw, aiohttp.ClientSession() as s:
                async with s.post(gw.url + "/v1/completions", json=big) as r:
                    assert r.status == 200
                    doc = await r.json()
                async with s.post(gw.url + "/v1/completions", json={"prompt": "no model"}) as r:
                    assert r.status == 200
                    doc2 = await r.json()
    finally:
        await bbr.aclose()
    assert doc["headers"]["x-gateway-model-name"] == "remote-m"
    assert doc["len"] == len(json.dumps(big))  # the upstream still gets the whole body
    assert picker.requests[0].model == "remote-m"
    assert doc2["headers"]["x-gateway-model-name"] == "dflt"


async def test_remote_bbr_down_fail_open_and_fail_closed(refused_port: Any) -> None:
    dead = f"127.0.0.1:{refused_port()}"
    async with backends("a") as (a,):
        reg = CollectorRegistry()
        cfg = gateway_config([a], bbr={"endpoint": dead, "timeout_ms": 2000, "default_model": "fallback"})
        async with (
            running_gateway(cfg, ScriptedPicker([a.key]), reg) as gw,
            aiohttp.ClientSession() as s,
            s.post(gw.url + "/v1/completions", json={"model": "m"}) as r,
        ):
            assert r.status == 200
            assert (await r.json())["headers"]["x-gateway-model-name"] == "fallback"
        assert metric_value(reg, "inferoute_gateway_errors_total", {"cause": "bbr-error"}) == 1

        closed = gateway_config([a], bbr={"endpoint": dead, "timeout_ms": 2000, "failure_mode_allow": False})
        async with (
            running_gateway(closed, ScriptedPicker([a.key])) as gw,
            aiohttp.ClientSession() as s,
            s.post(gw.url + "/v1/completions", json={"model": "m"}) as r,
        ):
            assert r.status == 502
            message = (await r.json())["error"]["message"]
            assert message == "body-based routing failed (unavailable)", message  # no address, no details
    assert len(a.requests) == 1
