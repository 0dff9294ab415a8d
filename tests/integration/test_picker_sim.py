"""The embedded picker against real simulated vLLM replicas (real sockets, real scrapes)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from inferoute.epp.assembly import EmbeddedPicker, EppOptions, start_picker
from inferoute.errors import InferouteError
from inferoute.picking import Destination, PickRequest
from inferoute.sim import SimConfig, SimPool

FAST = SimConfig(time_scale=0.05, lora_adapters=("sql", "chat"), max_loras=2, seed=3)


async def eventually(cond: Callable[[], bool], within: float = 10.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def pool() -> AsyncIterator[SimPool]:
    p = await SimPool.start(FAST, replicas=3, host="127.0.0.1", base_port=0)
    try:
        yield p
    finally:
        await p.aclose()


async def started(opts: EppOptions) -> EmbeddedPicker:
    picker = await start_picker(opts)
    await eventually(picker.ready, what="picker ready")
    return picker


def completion(model: str, prompt: str, **extra: object) -> PickRequest:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 4, **extra}).encode()
    return PickRequest("POST", "/v1/completions", {}, body)


async def test_ready_after_first_scrape_and_pool_gauges(pool: SimPool) -> None:
    registry = CollectorRegistry()
    picker = await start_picker(EppOptions(endpoints=pool.endpoints, registry=registry))
    try:
        assert not picker.ready()  # nothing scraped yet at startup
        await eventually(picker.ready, what="ready")
        decision, session = await picker.pick(completion(FAST.model, "hello"))
        session.response_finished()
        assert isinstance(decision, Destination)
        assert decision.endpoints[0] in {e.key for e in pool.endpoints}
        await eventually(
            lambda: registry.get_sample_value("inference_pool_ready_pods", {"name": "default"}) == 3
        )
        assert registry.get_sample_value("inferoute_epp_scrapes_total", {"outcome": "ok"}) >= 3  # type: ignore[operator]
    finally:
        await picker.aclose()
    assert not picker.ready()


async def test_prefix_affinity_lands_on_the_replica_that_caches_it(pool: SimPool) -> None:
    picker = await started(EppOptions(endpoints=pool.endpoints))
    prompt = "You are a meticulous assistant that answers in JSON. " * 60  # ~3 KB shared prefix
    served: Counter[str] = Counter()
    cached: list[int] = []
    try:
        async with aiohttp.ClientSession() as http:
            for i in range(8):
                decision, session = await picker.pick(completion(FAST.model, prompt + f" question {i}"))
                assert isinstance(decision, Destination)
                target = decision.endpoints[0]
                served[target] += 1
                async with http.post(
                    f"http://{target}/v1/completions",
                    data=json.dumps(
                        {"model": FAST.model, "prompt": prompt + f" question {i}", "max_tokens": 4}
                    ),
                    headers={"content-type": "application/json"},
                ) as resp:
                    session.response_started(target, resp.status, dict(resp.headers))
                    async for chunk in resp.content.iter_any():
                        session.response_chunk(chunk)
                    session.response_finished()
                usage = getattr(session, "usage", None)
                assert usage is not None, "usage parsed from the real response"
                cached.append(usage.cached_tokens)
        assert len(served) == 1, f"the shared prefix should stick to one replica, got {served}"
        assert cached[0] == 0 and all(c > 0 for c in cached[1:]), cached  # the replica really had it cached
        assert all(picker.learned.snapshot().inflight(e.key).requests == 0 for e in pool.endpoints)
    finally:
        await picker.aclose()


async def test_lora_affinity_from_real_lora_requests_info(pool: SimPool) -> None:
    config = """
plugins: [{type: lora-affinity-scorer}, {type: max-score-picker}]
schedulingProfiles: [{name: d, plugins: [{pluginRef: lora-affinity-scorer, weight: 1},
                                          {pluginRef: max-score-picker}]}]
"""
    picker = await started(EppOptions(endpoints=pool.endpoints, config_text=config))
    target = pool.endpoints[1]
    state = picker.datastore.get(target.key)
    assert state is not None
    try:
        async with aiohttp.ClientSession() as http:
            # a long-running "sql" request pins the adapter on replica 1 (the picker did not place it)
            long = asyncio.create_task(
                http.post(
                    f"http://{target.key}/v1/completions",
                    json={"model": "sql", "prompt": "x", "max_tokens": 2000, "ignore_eos": True},
                )
            )
            try:
                await eventually(
                    lambda: "sql" in state.metrics.active_adapters, what="sql active on replica 1"
                )
                assert state.metrics.max_lora == 2
                for _ in range(10):
                    decision, session = await picker.pick(completion("sql", "select 1"))
                    session.aborted("test")
                    assert isinstance(decision, Destination) and decision.endpoints == (target.key,)
            finally:
                long.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await long
    finally:
        await picker.aclose()


async def test_dead_replica_goes_stale_and_is_excluded(pool: SimPool) -> None:
    picker = await started(
        EppOptions(
            endpoints=pool.endpoints,
            staleness_threshold=0.4,
            scrape_timeout=0.2,
            config_text="plugins: [{type: round-robin-picker}]",
        )
    )
    dead = pool.replicas[0]
    try:
        await dead.aclose()
        state = picker.datastore.get(dead.endpoint.key)
        assert state is not None
        await eventually(
            lambda: state.failures > 0 and not state.fresh(picker.options.clock.now(), 0.4),
            what="dead replica stale",
        )
        picks = Counter()
        for _ in range(12):
            decision, session = await picker.pick(completion(FAST.model, "hi"))
            session.aborted("test")
            assert isinstance(decision, Destination)
            picks[decision.endpoints[0]] += 1
        assert dead.endpoint.key not in picks
        assert set(picks) == {r.endpoint.key for r in pool.replicas[1:]}
        assert picker.metrics.registry.get_sample_value("inferoute_epp_scrapes_total", {"outcome": "error"})
    finally:
        await picker.aclose()


async def test_endpoints_file_reload(pool: SimPool, tmp_path: Path) -> None:
    f = tmp_path / "endpoints.yaml"
    first, second = pool.endpoints[0], pool.endpoints[1]

    def write(*eps: object) -> None:
        f.write_text(
            "endpoints:\n"
            + "".join(f"- {{name: {e.name}, address: {e.address}, port: {e.port}}}\n" for e in eps)
        )  # type: ignore[attr-defined]

    write(first)
    picker = await started(
        EppOptions(
            endpoints_file=str(f),
            endpoints_poll_interval=0.05,
            config_text="plugins: [{type: round-robin-picker}]",
        )
    )
    try:
        decision, s = await picker.pick(completion(FAST.model, "a"))
        s.aborted("test")
        assert isinstance(decision, Destination) and decision.endpoints == (first.key,)
        write(second)
        await eventually(lambda: set(picker.datastore.states) == {second.key}, what="file reloaded")
        await eventually(picker.ready, what="new endpoint scraped")
        decision, s = await picker.pick(completion(FAST.model, "b"))
        s.aborted("test")
        assert isinstance(decision, Destination) and decision.endpoints == (second.key,)
        f.write_text("endpoints: [{name: broken}]\n")  # invalid: the last good list stays
        await eventually(
            lambda: (
                picker.metrics.registry.get_sample_value("inferoute_epp_endpoint_source_errors_total") == 1
            ),
            what="reload error",
        )
        assert set(picker.datastore.states) == {second.key}
    finally:
        await picker.aclose()


async def test_startup_errors_name_the_bad_key(pool: SimPool) -> None:
    with pytest.raises(InferouteError) as e:
        await start_picker(EppOptions(endpoints=pool.endpoints, config_text="plugins: [{type: nope-scorer}]"))
    assert (
        e.value.cause == "config" and "nope-scorer" in e.value.message and "queue-scorer" in e.value.message
    )
    with pytest.raises(InferouteError, match="endpoints"):
        await start_picker(EppOptions())
    with pytest.raises(InferouteError, match="valid: gie-default"):
        await start_picker(EppOptions(endpoints=pool.endpoints, profile="fastest"))
