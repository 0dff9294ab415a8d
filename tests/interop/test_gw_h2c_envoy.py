"""``app_protocol: h2c`` with real parts: the OpenAI SDK -> inferoute's gateway -> HTTP/2 cleartext (prior
knowledge) -> a real Envoy listener -> the simulator.

Envoy's listener takes both HTTP/1.1 and h2c (``codec_type: AUTO``: the embedded picker scrapes ``/metrics``
over HTTP/1.1, as pickers do) and its stats say which protocol each request came in on, so the tests check
that the gateway's requests arrived as HTTP/2 and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
from prometheus_client import CollectorRegistry

from inferoute.gateway.app import RunningGateway, start_gateway
from inferoute.gateway.config import parse_config
from inferoute.integrations.envoy import EnvoyProcess
from inferoute.sim import DEFAULT_MODEL, SimConfig, SimPool

_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
DISCONNECTED = f'inferoute_sim:errors_total{{cause="client-disconnect",model_name="{DEFAULT_MODEL}"}} 1.0'


def _addr(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def h2c_front(sim_port: int) -> dict[str, Any]:
    """An Envoy bootstrap: listener ``h2c`` (HTTP/1.1 or h2c) proxying to the simulator over HTTP/1.1."""
    hcm = {
        "@type": _HCM,
        "stat_prefix": "front",
        "codec_type": "AUTO",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "sim",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "sim", "timeout": "0s"}}],
                }
            ]
        },
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}}],
    }
    return {
        "admin": {"address": _addr(0)},
        "static_resources": {
            "listeners": [
                {
                    "name": "h2c",
                    "address": _addr(0),
                    "filter_chains": [
                        {
                            "filters": [
                                {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "sim",
                    "type": "STATIC",
                    "connect_timeout": "5s",
                    "load_assignment": {
                        "cluster_name": "sim",
                        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _addr(sim_port)}}]}],
                    },
                }
            ],
        },
    }


@dataclass
class Rig:
    gw: RunningGateway
    envoy: EnvoyProcess
    sims: SimPool

    async def stat(self, name: str) -> int:
        _, text = await self.envoy.admin_get(f"/stats?filter=^{re.escape(name)}$")
        return int(text.split(":")[1]) if ":" in text else 0


@contextlib.asynccontextmanager
async def rig(
    tmp_path: Path, *, picker: bool, dead_first: bool = False, time_scale: float = 0.05
) -> AsyncIterator[Rig]:
    sims = await SimPool.start(SimConfig(time_scale=time_scale), replicas=1)
    envoy = await EnvoyProcess.start(h2c_front(sims.replicas[0].port), str(tmp_path))
    dead = socket.socket()  # bound, never listening: connecting to it is refused
    dead.bind(("127.0.0.1", 0))
    gw = None
    try:
        await envoy.wait_ready(30, epp_healthy=False)
        front = f"127.0.0.1:{await envoy.listener_port('h2c')}"
        keys = [f"127.0.0.1:{dead.getsockname()[1]}", front] if dead_first else [front]
        eps = [{"address": k.split(":")[0], "port": int(k.split(":")[1])} for k in keys]
        route: dict[str, Any] = {
            "path": "/",
            "epp": {"endpoint": "embedded"} if picker else {"enabled": False},
        }
        cfg = parse_config(
            {"listen": "127.0.0.1:0", "pool": {"endpoints": eps, "app_protocol": "h2c"}, "routes": [route]}
        )
        gw = await start_gateway(cfg, registry=CollectorRegistry())
        for _ in range(200):
            if await gw.route_table.ready():
                break
            await asyncio.sleep(0.02)
        yield Rig(gw, envoy, sims)
    finally:
        if gw is not None:
            await gw.aclose(grace=1.0)
        await envoy.aclose()
        dead.close()
        await sims.aclose()


def sdk(gw: RunningGateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="not-needed", max_retries=0, timeout=30)


async def test_openai_sdk_through_the_picker_and_envoy_over_h2c(tmp_path: Path) -> None:
    async with rig(tmp_path, picker=True) as r:
        client = sdk(r.gw)
        try:
            resp = await client.chat.completions.create(
                model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Say hello"}], max_tokens=8
            )
            assert resp.choices[0].message.content and resp.model == DEFAULT_MODEL
            stream = await client.chat.completions.create(
                model=DEFAULT_MODEL,
                messages=[{"role": "user", "content": "Count to ten"}],
                max_tokens=12,
                stream=True,
            )
            pieces = [
                c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content
            ]
            assert len(pieces) >= 2  # token by token, not one blob
        finally:
            await client.close()
        assert await r.stat("http.front.downstream_rq_http2_total") == 2
        assert await r.stat("http.front.downstream_cx_http2_total") == 1  # both on one connection


async def test_fallback_past_a_refusing_endpoint(tmp_path: Path) -> None:
    """Round robin over [refusing, Envoy]: the requests that start at the refusing endpoint walk on."""
    async with rig(tmp_path, picker=False, dead_first=True) as r:
        client = sdk(r.gw)
        try:
            for _ in range(4):
                resp = await client.completions.create(
                    model=DEFAULT_MODEL, prompt="Once upon a time", max_tokens=4
                )
                assert resp.choices[0].text
        finally:
            await client.close()
        async with aiohttp.ClientSession() as s, s.get(r.gw.url + "/metrics") as m:
            text = await m.text()
        assert await r.stat("http.front.downstream_rq_http2_total") == 4
    assert 'inferoute_gateway_upstream_fallbacks_total{reason="connect",route="/"} 2.0' in text


async def test_a_client_that_goes_away_cancels_the_generation(tmp_path: Path) -> None:
    """The SDK closes a stream after two chunks: the gateway resets its HTTP/2 stream, Envoy drops its
    request to the simulator, and the simulator counts a client disconnect."""
    async with rig(tmp_path, picker=False, time_scale=1.0) as r:  # 2000 tokens take far longer than the test
        client = sdk(r.gw)
        try:
            stream = await client.completions.create(
                model=DEFAULT_MODEL, prompt="Tell a long story", max_tokens=2000, stream=True
            )
            seen = 0
            async for _ in stream:
                seen += 1
                if seen == 2:
                    break
            await stream.close()
        finally:
            await client.close()
        sim = r.sims.replicas[0]
        async with aiohttp.ClientSession() as s:
            for _ in range(400):
                async with s.get(f"http://127.0.0.1:{sim.port}/metrics") as m:
                    text = await m.text()
                if DISCONNECTED in text:
                    break
                await asyncio.sleep(0.05)
        assert DISCONNECTED in text
        assert await r.stat("http.front.downstream_rq_http2_total") == 1
        assert await r.stat("http.front.downstream_rq_rx_reset") == 1
