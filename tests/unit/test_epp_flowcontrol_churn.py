"""The reference's endpoint-churn flow-control tests, ported: saturation stays exact when endpoints go, come
back and are replaced while requests are in flight or queued (FakeClock, a real director, no sockets)."""

from __future__ import annotations

import asyncio
import random

from test_epp_flowcontrol_shell import prep, rig_and_flow

from inferoute.endpoints import Endpoint
from inferoute.epp.flowcontrol.stages import stage_saturation
from inferoute.picking import Destination, PickSession

KEY = "10.0.0.1:8000"


def saturation(rig, flow) -> float:  # type: ignore[no-untyped-def]
    now = rig.clock.now()
    return stage_saturation(flow.config.detector, rig.director.all_candidates(now), now)["effective"]


def drop_and_restore(rig, endpoints: list[Endpoint]) -> None:  # type: ignore[no-untyped-def]
    """What the picker does on an endpoint-set change (EmbeddedPicker._on_endpoints)."""
    rig.director.set_endpoints(endpoints)
    for ep in endpoints:
        rig.scrape(ep.key)


async def test_endpoint_reregistration_saturation_accuracy() -> None:
    """TestEndpointReregistrationSaturationAccuracy: an endpoint removed while a request runs on it and added
    back counts only what runs on it now; the old request ending does not take the new one's slot away."""
    rig, flow = rig_and_flow()
    d_old, s_old = await flow.pick(prep(rig))
    assert isinstance(d_old, Destination) and saturation(rig, flow) == 1.0
    ep = rig.endpoints[0]
    drop_and_restore(rig, [])
    drop_and_restore(rig, [ep])
    assert saturation(rig, flow) == 0.0  # the old pod's request is not on the new registration
    d_new, s_new = await flow.pick(prep(rig))
    assert isinstance(d_new, Destination) and saturation(rig, flow) == 1.0
    s_old.response_finished()  # the old request ends late
    assert saturation(rig, flow) == 1.0, "the new request still holds the only slot"
    s_new.response_finished()
    assert saturation(rig, flow) == 0.0


async def test_endpoint_identity_collision_during_pod_replacement() -> None:
    """TestEndpointIdentityCollisionDuringPodReplacement: a new pod on the old one's address (another name) in
    one update: the requests still running there count until they end, then the count is exact."""
    rig, flow = rig_and_flow(config=_CONFIG_2)
    _, s1 = await flow.pick(prep(rig))
    _, s2 = await flow.pick(prep(rig))
    drop_and_restore(rig, [Endpoint("pod-new", "10.0.0.1", 8000)])
    assert saturation(rig, flow) == 1.0
    s1.response_finished()
    s2.aborted("upstream-aborted")  # the old pod went away under it
    assert saturation(rig, flow) == 0.0
    _, s3 = await flow.pick(prep(rig))
    assert saturation(rig, flow) == 0.5
    s3.response_finished()


async def test_endpoint_churn_under_load() -> None:
    """TestEndpointChurnUnderLoad: queued and running requests while endpoints come and go at random: every
    request is answered (dispatched or dropped), none is stuck, every count returns to zero."""
    rig, flow = rig_and_flow(n=3, config=_CONFIG_CHURN)
    rng = random.Random(5)
    all_eps = [Endpoint(f"pod-{i}", f"10.0.0.{i + 1}", 8000) for i in range(4)]
    waiters: list[asyncio.Future[tuple[object, PickSession]]] = []
    running: list[PickSession] = []
    for _step in range(300):
        r = rng.random()
        if r < 0.45:
            waiters.append(asyncio.ensure_future(flow.pick(prep(rig))))
        elif r < 0.8 and running:
            running.pop(rng.randrange(len(running))).response_finished()
        elif r < 0.9:
            drop_and_restore(rig, rng.sample(all_eps, rng.randint(0, 4)))
            flow.kick()
        else:
            rig.clock.advance(0.5)
            flow.kick()
        await asyncio.sleep(0)
        for w in [w for w in waiters if w.done()]:
            waiters.remove(w)
            decision, session = w.result()
            if isinstance(decision, Destination):
                running.append(session)
    drop_and_restore(rig, all_eps)
    while waiters or running:
        for s in running:
            s.response_finished()
        running.clear()
        rig.clock.advance(1)
        flow.kick()
        await asyncio.sleep(0)
        for w in [w for w in waiters if w.done()]:
            waiters.remove(w)
            decision, session = w.result()
            if isinstance(decision, Destination):
                running.append(session)
    assert flow.core.count == 0
    view = rig.learned.snapshot()
    assert all(view.inflight(ep.key).requests == 0 for ep in all_eps)
    assert saturation(rig, flow) == 0.0


_CONFIG_2 = """
featureGates: [flowControl]
plugins:
- type: queue-scorer
- {type: concurrency-detector, parameters: {maxConcurrency: 2}}
flowControl: {maxRequests: 4, defaultRequestTTL: 10s}
"""
_CONFIG_CHURN = """
featureGates: [flowControl]
plugins:
- type: queue-scorer
- {type: concurrency-detector, parameters: {maxConcurrency: 2}}
flowControl: {maxRequests: 50, defaultRequestTTL: 5s, noEndpointRequestTTL: 3s}
"""
