"""Two ``inferoute gateway`` replicas, each with its embedded picker, sharing what they learn through a real
redis-server (``picker.sync_redis``): a prefix one gateway placed is routed to the same model server by the
other, which never saw it. Without the shared placements each gateway's approximate index knows only its own
decisions, and the second gateway places the prefix wherever its own tie-break falls."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry

from inferoute.endpoints import Endpoint
from inferoute.gateway.app import RunningGateway, start_gateway
from inferoute.gateway.config import parse_config
from inferoute.sim import DEFAULT_MODEL, SimConfig, SimPool
from inferoute.sim.server import POD_HEADER
from redis_server import redis_server

TIMEOUT = aiohttp.ClientTimeout(total=30)
"""A request hanging fails the test in 30 s with its own error, not at the suite's timeout."""
DOCS = [f"Handbook {i}: the quick brown fox jumps over the lazy dog, page {i}. " * 40 for i in range(8)]


async def gateway(pool: list[Endpoint], redis_url: str | None, registry: CollectorRegistry) -> RunningGateway:
    eps = [{"name": e.name, "address": e.address, "port": e.port} for e in pool]
    picker: dict[str, object] = {"refresh_interval": 0.02}
    if redis_url is not None:
        picker |= {"sync_redis": redis_url, "sync_interval": 0.05}
    cfg = parse_config(
        {
            "listen": "127.0.0.1:0",
            "pool": {"endpoints": eps},
            "picker": picker,
            "routes": [{"path": "/", "epp": {"endpoint": "embedded"}}],
        }
    )
    return await start_gateway(cfg, registry=registry)


async def ask(http: aiohttp.ClientSession, gw: RunningGateway, doc: str, question: str) -> str:
    body = {
        "model": DEFAULT_MODEL,
        "messages": [{"role": "user", "content": f"{doc} {question}"}],
        "max_tokens": 2,
    }
    async with http.post(gw.url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        await r.read()
        return r.headers[POD_HEADER]


async def test_a_prefix_placed_through_one_gateway_is_routed_alike_by_the_other(tmp_path: Path) -> None:
    with redis_server(tmp_path) as redis_url:
        async with (
            await SimPool.start(SimConfig(time_scale=0.02), replicas=3) as sims,
            contextlib.AsyncExitStack() as stack,
        ):
            registries = CollectorRegistry(), CollectorRegistry()
            a, b = [await gateway(sims.endpoints, redis_url, r) for r in registries]
            for gw in (a, b):
                stack.push_async_callback(gw.aclose, 1.0)
            async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
                placed = [await ask(http, a, doc, "Who wrote it?") for doc in DOCS]
                await asyncio.sleep(0.5)  # ten exchanges
                followed = [await ask(http, b, doc, "When?") for doc in DOCS]
                await asyncio.sleep(0.5)
            # the operator's view: each sees one peer, published its 8 placements and learned the other's 8
            for mine, theirs in (registries, registries[::-1]):
                labels = {"name": "default", "channel": "prefix"}
                assert mine.get_sample_value("inferoute_epp_sync_peers", {"name": "default"}) == 1
                assert mine.get_sample_value("inferoute_epp_sync_placements_published_total", labels) == 8
                assert theirs.get_sample_value("inferoute_epp_sync_placements_received_total", labels) == 8
                failures = mine.get_sample_value(
                    "inferoute_epp_sync_exchange_failures_total", {"name": "default"}
                )
                assert failures == 0
    assert len(set(placed)) > 1  # the idle pool's tie-break spread them: the index, not a tie, decides below
    assert followed == placed


async def test_an_unreachable_redis_costs_no_request_and_is_counted(tmp_path: Path) -> None:
    """``picker.sync_redis`` naming a Redis that is not there: the gateway still routes every request (each
    picker on its own), logs the failure once and counts every failed exchange."""
    registry = CollectorRegistry()
    async with await SimPool.start(SimConfig(time_scale=0.02), replicas=2) as sims:
        gw = await gateway(sims.endpoints, f"unix://{tmp_path}/no-redis.sock", registry)
        try:
            async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
                pods = [await ask(http, gw, doc, "Why?") for doc in DOCS[:4]]
            await asyncio.sleep(0.3)
            failures = registry.get_sample_value(
                "inferoute_epp_sync_exchange_failures_total", {"name": "default"}
            )
            peers = registry.get_sample_value("inferoute_epp_sync_peers", {"name": "default"})
        finally:
            await gw.aclose(1.0)
    assert len(pods) == 4  # every request answered (ask asserts 200)
    assert failures is not None and failures >= 3 and peers == 0
