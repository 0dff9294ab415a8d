"""Metrics label bomb: client-chosen model names never grow /metrics without bound.

10,000 distinct 1 KB model names go through a real gateway with the real embedded picker over real simulated
replicas: 9,000 in the body, answered 400 ``bad-model`` (longer than ``MAX_MODEL_NAME_CHARS``), 1,000 as a
``x-gateway-model-name-rewrite`` target, which the gateway strips (a client may not choose the served model).
Then 300 distinct valid names of 200 characters (longer than a label
may be: they share ``other``) and 300 distinct short names (the first ``MAX_MODEL_SERIES`` pairs get their
own series, the rest ``other``). The /metrics page stays under 3 MB throughout (1.1 MB measured).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from inferoute.epp.metrics import EppMetrics
from inferoute.gateway.app import start_gateway
from inferoute.gateway.config import parse_config
from inferoute.picking import MAX_MODEL_NAME_CHARS
from inferoute.sim import SimConfig, SimPool

METRICS_PAGE_LIMIT = 3 * 1024 * 1024


@pytest.fixture
async def pool() -> AsyncIterator[SimPool]:
    p = await SimPool.start(SimConfig(time_scale=0.01, seed=1), replicas=2, host="127.0.0.1", base_port=0)
    try:
        yield p
    finally:
        await p.aclose()


async def _blast(
    session: aiohttp.ClientSession, url: str, bodies: list[tuple[str, dict[str, str]]]
) -> list[int]:
    """POST every (model, headers) with 32 concurrent clients; the statuses in order."""
    statuses = [0] * len(bodies)
    queue = iter(enumerate(bodies))

    async def worker() -> None:
        for i, (model, headers) in queue:
            body = {"model": model, "prompt": "hi", "max_tokens": 1}
            async with session.post(url, json=body, headers=headers) as r:
                await r.read()
                statuses[i] = r.status

    await asyncio.gather(*(worker() for _ in range(32)))
    return statuses


async def test_ten_thousand_long_model_names_leave_metrics_small(pool: SimPool) -> None:
    cfg = parse_config(
        {
            "listen": "127.0.0.1:0",
            "pool": {"endpoints": [{"address": e.address, "port": e.port} for e in pool.endpoints]},
            "routes": [{"path": "/", "epp": {"endpoint": "embedded"}}],
        }
    )
    gw = await start_gateway(cfg, registry=CollectorRegistry())
    try:
        async with aiohttp.ClientSession() as s:
            url = gw.url + "/v1/completions"
            long_names = [f"{i:06d}" + "m" * 1018 for i in range(10_000)]
            in_body = [(name, {}) for name in long_names[:9_000]]
            as_rewrite = [
                (SimConfig().model, {"x-gateway-model-name-rewrite": n}) for n in long_names[9_000:]
            ]
            statuses = await _blast(s, url, in_body + as_rewrite)
            assert set(statuses[:9_000]) == {400}, "names longer than MAX_MODEL_NAME_CHARS are refused"
            assert set(statuses[9_000:]) == {200}, "a client's rewrite header is stripped, never a label"
            async with s.get(gw.url + "/metrics") as r:
                page = await r.read()
            assert len(page) < 200_000
            assert b"m" * 200 not in page

            mid = [(f"{i:04d}" + "x" * (MAX_MODEL_NAME_CHARS - 60), {}) for i in range(300)]
            short = [(f"model-{i}", {}) for i in range(300)]
            await _blast(s, url, mid + short)
            async with s.get(gw.url + "/metrics") as r:
                page = await r.read()
    finally:
        await gw.aclose(grace=1.0)
    text = page.decode()
    assert len(page) < METRICS_PAGE_LIMIT, len(page)
    assert "x" * 150 not in text, "labels longer than MAX_LABEL_CHARS never appear"
    models = {
        line.split('model_name="', 1)[1].split('"', 1)[0]
        for line in text.splitlines()
        if line.startswith("inference_objective_request_total{")
    }
    assert "other" in models
    assert len(models) <= EppMetrics.MAX_MODEL_SERIES + 1
