"""Flow control's asyncio shell over a real director (FakeClock, hand-fed metrics, no sockets, no sleeps)."""

from __future__ import annotations

import asyncio
import json

import pytest
from test_epp_rig import Rig, body, pick_request

from inferoute.epp.flowcontrol.shell import FlowControl
from inferoute.epp.flowcontrol.signals import FlowControlMetrics
from inferoute.epp.requestcontrol.director import Prepared
from inferoute.picking import Destination, Reject

CONFIG = """
featureGates: [flowControl]
plugins:
- type: queue-scorer
- {type: concurrency-detector, parameters: {maxConcurrency: 1}}
- type: round-robin-fairness-policy
objectives: {chat: 10, batch: -1}
flowControl:
  maxRequests: 4
  defaultRequestTTL: 10s
  defaultPriorityBand: {fairnessPolicyRef: round-robin-fairness-policy}
"""


def rig_and_flow(n: int = 1, config: str = CONFIG) -> tuple[Rig, FlowControl]:
    rig = Rig(n, config)
    assert rig.config.flow is not None
    flow = FlowControl(rig.config.flow, rig.director, rig.clock, FlowControlMetrics(rig.registry, "pool"))
    return rig, flow


def prep(rig: Rig, headers: dict[str, str] | None = None) -> Prepared:
    p = rig.director.prepare(pick_request(body(), headers=headers))
    assert isinstance(p, Prepared)
    return p


async def test_fast_path_is_synchronous_and_a_finished_response_releases_the_next() -> None:
    rig, flow = rig_and_flow()
    d1, s1 = await flow.pick(prep(rig))
    assert isinstance(d1, Destination)
    waiter = asyncio.ensure_future(flow.pick(prep(rig)))
    await asyncio.sleep(0)
    assert not waiter.done() and flow.core.count == 1  # one slot, taken
    s1.response_finished()  # capacity freed: the queued request is dispatched at once
    d2, s2 = await asyncio.wait_for(waiter, 1)
    assert isinstance(d2, Destination) and flow.core.count == 0
    s2.response_finished()
    assert (
        rig.value(
            "llm_d_epp_flow_control_requests_total",
            {"outcome": "Dispatched", "priority": "0", "inference_pool": "pool"},
        )
        == 2
    )
    assert (
        rig.value(
            "inference_extension_flow_control_requests_total",
            {"outcome": "Dispatched", "priority": "0", "inference_pool": "pool"},
        )
        == 2
    )


async def test_priority_dispatches_first_and_capacity_rejects_with_the_reason() -> None:
    rig, flow = rig_and_flow()
    _, s = await flow.pick(prep(rig))
    low = [
        asyncio.ensure_future(flow.pick(prep(rig, {"x-llm-d-inference-objective": "batch"})))
        for _ in range(3)
    ]
    await asyncio.sleep(0)
    high = asyncio.ensure_future(flow.pick(prep(rig, {"x-gateway-inference-objective": "chat"})))
    await asyncio.sleep(0)
    extra = await flow.pick(prep(rig))  # maxRequests 4 reached
    assert isinstance(extra[0], Reject) and extra[0].status == 429
    assert extra[0].headers["x-llm-d-request-dropped-reason"] == "rejected-saturated"
    assert json.loads(extra[0].body)["error"]["code"] == 429
    s.response_finished()
    d, s2 = await asyncio.wait_for(high, 1)
    assert isinstance(d, Destination) and all(not f.done() for f in low)
    flow.close()
    for f in low:
        r, _ = await f
        assert isinstance(r, Reject) and r.status == 503
        assert r.headers["x-llm-d-request-dropped-reason"] == "rejected-shutting-down"
    s2.response_finished()


async def test_ttl_expiry_is_429_and_the_header_ttl_is_clamped() -> None:
    rig, flow = rig_and_flow()
    _, s = await flow.pick(prep(rig))
    short = asyncio.ensure_future(flow.pick(prep(rig, {"x-llm-d-request-ttl-ms": "500"})))
    long = asyncio.ensure_future(flow.pick(prep(rig, {"x-llm-d-request-ttl-ms": "999999"})))
    await asyncio.sleep(0)
    rig.clock.advance(0.5)
    flow.kick()
    r, _ = await asyncio.wait_for(short, 1)
    assert isinstance(r, Reject) and r.status == 429
    assert r.headers["x-llm-d-request-dropped-reason"] == "rejected-ttl-expired"
    assert not long.done()
    rig.clock.advance(9.5)  # the band's 10 s budget caps the header's 999 s
    flow.kick()
    r, _ = await asyncio.wait_for(long, 1)
    assert isinstance(r, Reject) and r.status == 429
    s.response_finished()


async def test_client_gone_leaves_the_queue_at_once() -> None:
    rig, flow = rig_and_flow()
    _, s = await flow.pick(prep(rig))
    waiter = asyncio.ensure_future(flow.pick(prep(rig)))
    await asyncio.sleep(0)
    assert flow.core.count == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert flow.core.count == 0
    assert (
        rig.value(
            "llm_d_epp_flow_control_requests_total",
            {"outcome": "EvictedContextCancelled", "priority": "0", "inference_pool": "pool"},
        )
        == 1
    )
    s.response_finished()
    assert rig.learned.snapshot().inflight("10.0.0.1:8000").requests == 0


async def test_empty_pool_waits_then_sheds_as_unavailable() -> None:
    rig, flow = rig_and_flow()
    rig.datastore.set_endpoints([])
    waiter = asyncio.ensure_future(flow.pick(prep(rig)))
    await asyncio.sleep(0)
    rig.clock.advance(10)
    flow.kick()
    r, _ = await asyncio.wait_for(waiter, 1)
    assert isinstance(r, Reject) and r.status == 503
    assert r.headers["x-llm-d-request-dropped-reason"] == "rejected-no-endpoints"


async def test_gauges_and_replica_signal_are_exposed() -> None:
    rig, flow = rig_and_flow()
    flow.metrics.watch(flow.core, lambda: (1, {"effective": 1.0, "decode": 1.0}, 0, 1.0))  # type: ignore[union-attr]
    _, s = await flow.pick(prep(rig))
    waiter = asyncio.ensure_future(flow.pick(prep(rig, {"x-llm-d-inference-fairness-id": "t1"})))
    await asyncio.sleep(0)
    labels = {
        "fairness_id": "t1",
        "priority": "0",
        "inference_pool": "pool",
        "model_name": "m",
        "target_model_name": "m",
    }
    assert rig.value("llm_d_epp_flow_control_queue_size", labels) == 1
    assert rig.value("inference_extension_flow_control_queue_size", labels) == 1
    assert rig.value("llm_d_epp_flow_control_queue_bytes", labels) == len(body())
    assert (
        rig.value("llm_d_epp_flow_control_pool_saturation", {"inference_pool": "pool", "stage": "effective"})
        == 1.0
    )
    assert rig.value("inferoute_epp_flow_control_recommended_replicas", {"inference_pool": "pool"}) == 3
    assert (
        rig.value("llm_d_epp_flow_control_global_capacity_utilization_requests", {"inference_pool": "pool"})
        == 0.25
    )
    s.response_finished()
    (await waiter)[1].response_finished()


async def test_capacity_utilization_omits_an_unset_global_cap() -> None:
    rig, flow = rig_and_flow(config=CONFIG.replace("  maxRequests: 4\n", ""))
    assert flow.metrics is not None
    flow.metrics.watch(flow.core, lambda: (1, {"effective": 0.0, "decode": 0.0}, 0, 1.0))
    _, s = await flow.pick(prep(rig))
    names = {f.name for f in rig.registry.collect()}
    assert "llm_d_epp_flow_control_capacity_utilization_requests" in names
    assert not any("global_capacity_utilization" in n for n in names)
    s.response_finished()


def test_gate_off_ignores_the_section_but_keeps_its_detector() -> None:
    rig = Rig(1, CONFIG.replace("featureGates: [flowControl]", "featureGates: [flowControl=false]"))
    assert rig.config.flow is None
    rig2 = Rig(1, "flowControl: {saturationDetector: {pluginRef: concurrency-detector}}")
    assert rig2.config.flow is None and rig2.config.saturation is not None
    assert rig2.config.saturation.type_name == "concurrency-detector"


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


async def test_queue_flood_stays_within_max_bytes() -> None:
    """800 requests of 100 KB (80 MB offered) against a 16 MiB queue with no free slot: the queue holds
    at most 16 MiB, the rest is refused 429 at once and freed, and the process grows by about the cap."""
    import gc

    config = CONFIG.replace("  maxRequests: 4\n", "  maxBytes: 16Mi\n")
    rig, flow = rig_and_flow(config=config)
    _, s = await flow.pick(prep(rig))  # takes the only slot
    gc.collect()
    before = _rss_bytes()
    waiters = []
    refused = 0
    for i in range(800):
        big = pick_request(body(prompt=f"{i} " + "x" * 100_000))
        p = rig.director.prepare(big)
        assert isinstance(p, Prepared)
        fut = asyncio.ensure_future(flow.pick(p))
        await asyncio.sleep(0)
        if fut.done():
            r, _ = fut.result()
            assert isinstance(r, Reject) and r.status == 429
            refused += 1
        else:
            waiters.append(fut)
        assert flow.core.bytes <= 16 * 2**20
    gc.collect()
    grown = _rss_bytes() - before
    print(f"queued {flow.core.count} / {flow.core.bytes} bytes, refused {refused}, RSS +{grown >> 20} MiB")
    assert refused > 600 and flow.core.bytes > 15 * 2**20
    assert grown < 48 * 2**20  # the 16 MiB of queued bodies plus interpreter overhead, not 80 MB
    flow.close()
    for f in waiters:
        r, _ = await f
        assert isinstance(r, Reject) and r.status == 503
    s.response_finished()
