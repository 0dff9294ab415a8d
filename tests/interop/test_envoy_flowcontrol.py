"""Flow control behind real Envoy: ``inferoute epp``'s server + the EmbeddedPicker + simulated replicas.

The ext_proc path waits like the embedded one, and keeps the interactive TTFT under a 2x overload as the
embedded gateway does (:mod:`priority_overload`): a queued request holds its ext_proc stream open until it is
dispatched or dropped; a drop is an ImmediateResponse carrying the status, the OpenAI JSON body and
``x-llm-d-request-dropped-reason``; a client that leaves resets the stream, which takes it out of the queue.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import priority_overload
import pytest
from dataplanes import PLANES
from prometheus_client import CollectorRegistry

from inferoute.epp.assembly import EmbeddedPicker, EppOptions, start_picker
from inferoute.epp.serving.server import EppServer, ServerOptions
from inferoute.integrations.envoy import EnvoyProcess, bootstrap
from inferoute.sim import SimConfig, SimPool

MODEL = SimConfig().model
CONFIG = """
featureGates: [flowControl]
plugins:
- type: queue-scorer
- {type: concurrency-detector, parameters: {maxConcurrency: 1}}
objectives: {interactive: 10, batch: -1}
flowControl:
  maxRequests: 3
  defaultPriorityBand: {fairnessPolicyRef: round-robin-fairness-policy}
modelRewrites:
- name: split
  rules:
  - matches: [{model: {type: Exact, value: food-review}}]
    targets: [{modelRewrite: food-v1, weight: 70}, {modelRewrite: food-v2, weight: 30}]
"""


@dataclass
class Rig:
    url: str
    picker: EmbeddedPicker


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    sim = SimConfig(time_scale=0.1, lora_adapters=("food-v1", "food-v2"), max_loras=2, seed=5)
    pool = await SimPool.start(sim, replicas=1, host="127.0.0.1", base_port=0)
    picker = server = envoy = None
    try:
        picker = await start_picker(
            EppOptions(endpoints=pool.endpoints, registry=CollectorRegistry(), seed=3, config_text=CONFIG)
        )
        server = await EppServer.start(
            picker, ServerOptions(host="127.0.0.1", grpc_port=0, health_port=None), CollectorRegistry()
        )
        cfg = bootstrap(
            f"127.0.0.1:{server.grpc_port}",
            0,
            admin_port=0,
            listen_address="127.0.0.1",
            health_check_interval=0.5,
        )
        envoy = await EnvoyProcess.start(cfg, str(tmp_path))
        await envoy.wait_ready(30)
        yield Rig(f"http://127.0.0.1:{await envoy.listener_port()}", picker)
    finally:
        if envoy is not None:
            await envoy.aclose()
        if server is not None:
            await server.aclose(0)
        if picker is not None:
            await picker.aclose()
        await pool.aclose()


async def _post(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str], **body: object
) -> tuple[int, dict[str, str], bytes]:
    payload = {"model": MODEL, "prompt": "hi", "max_tokens": 4, **body}
    async with http.post(f"{url}/v1/completions", json=payload, headers=headers) as r:
        return r.status, dict(r.headers), await r.read()


async def _until(cond: object, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        await asyncio.sleep(0.01)


async def test_queueing_priority_drops_and_disconnects_through_envoy(rig: Rig) -> None:
    flow = rig.picker.flow
    assert flow is not None
    async with aiohttp.ClientSession() as http:
        blocker = asyncio.ensure_future(_post(http, rig.url, {}, max_tokens=3000, ignore_eos=True))
        await asyncio.sleep(0.3)
        # TTL expiry: 429 with the reason, through Envoy's ImmediateResponse
        status, headers, body = await _post(http, rig.url, {"x-llm-d-request-ttl-ms": "150"})
        assert status == 429, body
        assert headers["x-llm-d-request-dropped-reason"] == "rejected-ttl-expired"
        # two batch requests and one interactive queue; the interactive one is dispatched first
        order: list[str] = []

        async def tracked(name: str, objective: str) -> None:
            s, _, _ = await _post(http, rig.url, {"x-llm-d-inference-objective": objective})
            assert s == 200
            order.append(name)

        batch = [asyncio.ensure_future(tracked(f"batch{i}", "batch")) for i in range(2)]
        await _until(lambda: flow.core.count == 2)
        # a client that leaves while queued: Envoy resets the ext_proc stream, the request leaves the queue
        async with aiohttp.ClientSession() as leaving:
            gone = asyncio.ensure_future(_post(leaving, rig.url, {}))
            await _until(lambda: flow.core.count == 3)
            status, headers, _ = await _post(http, rig.url, {})  # maxRequests 3: full
            assert status == 429 and headers["x-llm-d-request-dropped-reason"] == "rejected-saturated"
            gone.cancel()
        await _until(lambda: flow.core.count == 2, within=5)
        hi = asyncio.ensure_future(tracked("interactive", "interactive"))
        await _until(lambda: flow.core.count == 3)
        blocker.cancel()
        await asyncio.wait_for(asyncio.gather(hi, *batch), 10)
    assert order[0] == "interactive", order


async def test_weighted_rewrite_through_envoy(rig: Rig) -> None:
    answered: Counter[str] = Counter()
    async with aiohttp.ClientSession() as http:
        for _ in range(100):
            async with http.post(
                f"{rig.url}/v1/completions", json={"model": "food-review", "prompt": "x", "max_tokens": 1}
            ) as r:
                assert r.status == 200
                answered[(await r.json())["model"]] += 1
    assert answered == {"food-review": 100}, "the picker restores the asked name in the echoed body"
    models: Counter[str] = Counter()
    for s in rig.picker.metrics.registry.collect():
        for sample in s.samples:
            if (
                sample.name == "inference_objective_request_total"
                and sample.labels["model_name"] == "food-review"
            ):
                models[sample.labels["target_model_name"]] += int(sample.value)
    sigma = (0.7 * 0.3 / 100) ** 0.5
    assert abs(models["food-v1"] / 100 - 0.7) <= max(0.10, 4.5 * sigma), models


async def test_priority_under_2x_overload_through_envoy(tmp_path: Path) -> None:
    """The 2x-overload proof through real Envoy and ``inferoute epp``'s server: the interactive p90 TTFT
    within 1.5x of its unloaded value (measured just before), sheddable requests answered 429
    ``rejected-saturated`` by Envoy's ImmediateResponse. Every response body also streams through the
    picker (FULL_DUPLEX_STREAMED), on the event loop that runs the client and the simulator."""
    async with (
        await SimPool.start(priority_overload.SIM, replicas=priority_overload.REPLICAS) as pool,
        PLANES["envoy"](pool, priority_overload.CONFIG, tmp_path) as (url, _),
    ):
        outcome = await priority_overload.run(url)
    print(outcome.summary())
    outcome.check()
