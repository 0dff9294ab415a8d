"""Round-robin fairness through ``inferoute epp`` (gateway over gRPC, real Envoy): two tenants offering 10:1
get 1:1 dispatch while both are queued behind a saturated pool (the embedded gateway's twin is
tests/integration/test_flowcontrol_gateway.py)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest
from dataplanes import PLANES
from prometheus_client import CollectorRegistry

from inferoute.sim import SimConfig, SimPool

FAIR = """
featureGates: [flowControl]
plugins:
- type: queue-scorer
- {type: concurrency-detector, parameters: {maxConcurrency: 1}}
flowControl:
  defaultPriorityBand: {fairnessPolicyRef: round-robin-fairness-policy}
"""


def queued(registry: CollectorRegistry) -> float:
    return sum(
        s.value
        for fam in registry.collect()
        for s in fam.samples
        if s.name == "llm_d_epp_flow_control_queue_size"
    )


@pytest.mark.parametrize("mode", ["grpc", "envoy"])
async def test_round_robin_gives_two_tenants_equal_shares_while_saturated(mode: str, tmp_path: Path) -> None:
    sim = SimConfig(time_scale=0.1, seed=2)
    async with (
        await SimPool.start(sim, replicas=1) as pool,
        PLANES[mode](pool, FAIR, tmp_path) as (url, registry),
        aiohttp.ClientSession() as http,
    ):
        order: list[str] = []

        async def tenant(name: str, max_tokens: int = 8) -> None:
            body = {"model": sim.model, "prompt": "hi", "max_tokens": max_tokens, "ignore_eos": True}
            headers = {"x-llm-d-inference-fairness-id": name}
            async with http.post(url + "/v1/completions", json=body, headers=headers) as r:
                assert r.status == 200, await r.text()
                await r.read()
            order.append(name)

        async def until(n: int) -> None:
            deadline = time.monotonic() + 10
            while queued(registry) != n:
                assert time.monotonic() < deadline, f"queue {queued(registry)} != {n}"
                await asyncio.sleep(0.01)

        for _ in range(200):  # the picker's first scrape
            async with http.post(url + "/v1/completions", json={"model": sim.model, "prompt": "x"}) as r:
                if r.status == 200:
                    break
            await asyncio.sleep(0.05)
        blocker = asyncio.ensure_future(tenant("blocker", 1500))  # holds the only slot for ~1.5 s
        await asyncio.sleep(0.3)
        tasks = [asyncio.ensure_future(tenant("heavy")) for _ in range(30)]
        await until(30)
        tasks += [asyncio.ensure_future(tenant("light")) for _ in range(3)]
        await until(33)
        await asyncio.gather(blocker, *tasks)
    served = order[1:]  # after the blocker: one slot, so completion order is dispatch order
    assert served[:6].count("light") == 3, served[:8]  # 10:1 offered, 1:1 dispatched while both queued
