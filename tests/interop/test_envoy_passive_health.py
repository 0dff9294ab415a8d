"""Passive health behind real Envoy: the endpoint Envoy could not connect to is marked down in the picker.

Envoy (ORIGINAL_DST, one endpoint per request) answers a connection it cannot open with its own 503. That
local reply passes the ext_proc filter's response phase like a model server's answer, with the attributes
``inferoute envoy-config`` asks for: ``upstream.address`` (the endpoint) and ``response.code_details``
(``upstream_reset_before_response_started{remote_connection_failure|...}`` or ``{connection_timeout}``).
The picker marks that endpoint down at once, so the replica costs one request, not every second one (round
robin) until its metrics go stale.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from inferoute.endpoints import Endpoint
from inferoute.epp.assembly import EppOptions, start_picker
from inferoute.epp.serving.server import EppServer, ServerOptions
from inferoute.integrations.envoy import EnvoyProcess, bootstrap
from inferoute.sim import SimConfig, SimPool
from tcp_relay import FreezableRelay

MODEL = SimConfig().model


def _connect_timeout(cfg: dict[str, Any], seconds: float) -> None:
    for cluster in cfg["static_resources"]["clusters"]:
        if cluster["name"] == "inference_pool":
            cluster["connect_timeout"] = f"{seconds}s"


async def _complete(http: aiohttp.ClientSession, url: str, i: int) -> tuple[int, str]:
    body = {"model": MODEL, "prompt": f"{i} " * 32, "max_tokens": 1}
    async with http.post(url + "/v1/completions", json=body) as r:
        data = await r.json()
        if r.status != 200:
            assert data["error"]["code"] == r.status  # Envoy's local reply, OpenAI-style
        return r.status, r.headers.get("x-inference-port", "")


@pytest.mark.parametrize(
    ("cluster", "failure"),
    [("original_dst", "refused"), ("original_dst", "timeout"), ("endpoints", "refused")],
)
async def test_endpoint_envoy_cannot_connect_to_is_marked_down(
    cluster: str, failure: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``endpoints``: the static cluster of ``envoy-config --endpoints`` (``override_host``), whose retries
    serve the request elsewhere; the picker learns of the skipped endpoint from the served one."""
    async with contextlib.AsyncExitStack() as stack:
        pool = await SimPool.start(
            SimConfig(time_scale=0.01, seed=1), replicas=2, host="127.0.0.1", base_port=0
        )
        stack.push_async_callback(pool.aclose)
        sim0, sim1 = (e.port for e in pool.endpoints)
        front = await stack.enter_async_context(FreezableRelay(sim0))
        endpoints = [Endpoint("s0", "127.0.0.1", front.port), Endpoint("s1", "127.0.0.1", sim1)]
        picker = await start_picker(EppOptions(endpoints=endpoints, profile="round-robin"))
        stack.push_async_callback(picker.aclose)
        opts = ServerOptions(host="127.0.0.1", grpc_port=0, health_port=None, insecure=True)
        server = await EppServer.start(picker, opts, CollectorRegistry())
        stack.push_async_callback(server.aclose, 0)
        listed = [e.key for e in endpoints] if cluster == "endpoints" else None
        cfg = bootstrap(
            f"127.0.0.1:{server.grpc_port}",
            0,
            admin_port=0,
            listen_address="127.0.0.1",
            insecure=True,
            endpoints=listed,
        )
        _connect_timeout(cfg, 0.3)
        envoy = await EnvoyProcess.start(cfg, str(tmp_path))
        stack.push_async_callback(envoy.aclose)
        await envoy.wait_ready(30)
        url = f"http://127.0.0.1:{await envoy.listener_port()}"
        http = await stack.enter_async_context(aiohttp.ClientSession())
        seen = {await _complete(http, url, i) for i in range(4)}
        assert seen == {(200, str(sim0)), (200, str(sim1))}, "both replicas serve through Envoy"
        await (front.refuse() if failure == "refused" else front.freeze())
        after = [await _complete(http, url, i) for i in range(10, 18)]
    print(f"{cluster} {failure}: after the failure {after}")
    failed = 1 if cluster == "original_dst" else 0  # ORIGINAL_DST: one address, nothing to retry on
    assert [s for s, _ in after].count(503) == failed, "one request met the dead replica, then it was dropped"
    assert {(s, p) for s, p in after if s == 200} == {(200, str(sim1))}
    down = [r.getMessage() for r in caplog.records if "marked down" in r.getMessage()]
    reason = {"refused": "remote_connection_failure", "timeout": "connection_timeout"}[failure]
    if cluster == "endpoints":
        reason = f"skipped by Envoy's retries (served by 127.0.0.1:{sim1})"
    assert len(down) == 1 and f"127.0.0.1:{front.port}" in down[0] and reason in down[0], down
    assert not [r for r in caplog.records if r.exc_info]
