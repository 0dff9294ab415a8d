"""In-flight eviction in every data-plane mode (embedded gateway, gateway + ``inferoute epp`` over gRPC, real
Envoy + ``inferoute epp``): a sheddable request holding the only slot is evicted for an interactive one,
answered 429 ``evicted`` before its answer started and cut off after."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest
from dataplanes import PLANES
from prometheus_client import CollectorRegistry

from inferoute.sim import SimConfig, SimPool

CONFIG = """
featureGates: [flowControl]
plugins:
- type: queue-scorer
- {type: concurrency-detector, parameters: {maxConcurrency: 1}}
objectives: {interactive: 10, batch: -1}
flowControl:
  enableEviction: true
"""
LO = {"x-llm-d-inference-objective": "batch"}
HI = {"x-llm-d-inference-objective": "interactive"}


def value(reg: CollectorRegistry, name: str, labels: dict[str, str]) -> float:
    return reg.get_sample_value(name, labels) or 0.0


async def until(cond: object, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("mode", list(PLANES))
async def test_eviction_through_the_data_plane(mode: str, tmp_path: Path) -> None:
    sim = SimConfig(time_scale=0.25, seed=2)  # a batch request alone would run ~10 s
    async with (
        await SimPool.start(sim, replicas=1) as pool,
        PLANES[mode](pool, CONFIG, tmp_path) as (url, reg),
    ):
        model = sim.model
        running = {"inference_pool": "default"}

        def in_flight() -> float:
            return sum(
                s.value
                for fam in reg.collect()
                for s in fam.samples
                if s.name == "inference_objective_running_requests"
            )

        def sheddable_dispatched() -> float:
            labels = {"outcome": "Dispatched", "priority": "-1", **running}
            return value(reg, "llm_d_epp_flow_control_requests_total", labels)

        async with aiohttp.ClientSession() as http:
            for _ in range(200):  # the picker's first scrape
                async with http.post(
                    url + "/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 1}
                ) as r:
                    if r.status == 200:
                        break
                await asyncio.sleep(0.05)
            long = {"model": model, "prompt": "long", "max_tokens": 4000, "ignore_eos": True}
            batch = asyncio.ensure_future(http.post(url + "/v1/completions", json=long, headers=LO))
            await until(lambda: sheddable_dispatched() == 1)
            t0 = time.monotonic()
            async with http.post(
                url + "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 4}, headers=HI
            ) as r:
                assert r.status == 200
            assert time.monotonic() - t0 < 5
            r = await asyncio.wait_for(batch, 5)
            assert r.status == 429 and r.headers["x-llm-d-request-dropped-reason"] == "evicted"
            assert (await r.json())["error"]["message"] == "request evicted by flow control"
            r.release()

            async def streamed() -> bytes:
                async with http.post(url + "/v1/completions", json={**long, "stream": True}, headers=LO) as r:
                    assert r.status == 200
                    got = b""
                    try:
                        async for chunk in r.content.iter_any():
                            got += chunk
                    except aiohttp.ClientPayloadError:
                        return got
                    raise AssertionError("the evicted stream ended normally")

            cut = asyncio.ensure_future(streamed())
            await until(lambda: sheddable_dispatched() == 2)
            await asyncio.sleep(0.2)
            async with http.post(
                url + "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 4}, headers=HI
            ) as r:
                assert r.status == 200
            got = await asyncio.wait_for(cut, 5)
            assert b"data: " in got and b"[DONE]" not in got
            await until(lambda: in_flight() == 0)
            # the model server stopped generating for the evicted requests (their connection was reset)
            engine = pool.replicas[0].engine
            await until(lambda: engine.num_running == 0, within=2)
            issued = value(reg, "llm_d_epp_flow_control_revocations_issued_total", running)
            confirmed = value(
                reg, "llm_d_epp_flow_control_revocations_total", {"outcome": "confirmed", **running}
            )
    assert (issued, confirmed) == (2, 2)
