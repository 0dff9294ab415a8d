"""The real EmbeddedPicker (GIE default profile) behind our ext_proc server, asked by GrpcPicker over gRPC,
in front of simulated vLLM replicas."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from inferoute.epp.assembly import EmbeddedPicker, EppOptions, start_picker
from inferoute.epp.serving.server import EppServer, ServerOptions
from inferoute.extproc.client import ChannelOptions, GrpcPicker
from inferoute.picking import Destination, PickRequest, Reject
from inferoute.sim import SimConfig, SimPool


@dataclass
class Rig:
    pool: SimPool
    picker: EmbeddedPicker
    server: EppServer
    client: GrpcPicker

    @property
    def keys(self) -> list[str]:
        return [e.key for e in self.pool.endpoints]


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    pool = await SimPool.start(SimConfig(time_scale=0.05), replicas=3, host="127.0.0.1", base_port=0)
    picker = server = client = None
    try:
        picker = await start_picker(
            EppOptions(endpoints=pool.endpoints, registry=CollectorRegistry(), seed=1)
        )
        server = await EppServer.start(
            picker,
            ServerOptions(host="127.0.0.1", grpc_port=0, health_port=0, insecure=True),
            CollectorRegistry(),
        )
        client = GrpcPicker(ChannelOptions(f"127.0.0.1:{server.grpc_port}", tls=False), timeout_ms=5000)
        for _ in range(400):  # the picker is ready once every replica was scraped
            if picker.ready():
                break
            await asyncio.sleep(0.05)
        assert picker.ready(), "picker not ready after 20 s"
        yield Rig(pool, picker, server, client)
    finally:
        if client is not None:
            await client.aclose()
        if server is not None:
            await server.aclose(0)
        if picker is not None:
            await picker.aclose()
        await pool.aclose()


def _completion(prompt: str, **extra: object) -> bytes:
    return json.dumps({"model": SimConfig().model, "prompt": prompt, "max_tokens": 4, **extra}).encode()


async def _send(http: aiohttp.ClientSession, rig: Rig, body: bytes) -> str:
    """Pick over ext_proc, send to the picked replica, report the response phase; returns the endpoint."""
    decision, session = await rig.client.pick(PickRequest("POST", "/v1/completions", {"host": "gw"}, body))
    assert isinstance(decision, Destination), decision
    target = decision.endpoints[0]
    async with http.post(
        f"http://{target}/v1/completions",
        data=decision.body or body,
        headers={"content-type": "application/json"},
    ) as r:
        session.response_started(target, r.status, dict(r.headers))
        async for chunk in r.content.iter_any():
            session.response_chunk(chunk)
        assert r.status == 200
    session.response_finished()
    return target


async def test_real_picker_round_trip_and_health(rig: Rig) -> None:
    async with aiohttp.ClientSession() as http:
        targets = {await _send(http, rig, _completion(f"hello {i}")) for i in range(6)}
    assert targets <= set(rig.keys)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{rig.server.health_port}") as ch:
        status = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="envoy.service.ext_proc.v3.ExternalProcessor"), timeout=5
        )
    assert status.status == health_pb2.HealthCheckResponse.SERVING  # follows EmbeddedPicker.ready()


async def test_long_shared_prefix_keeps_landing_on_the_replica_that_cached_it(rig: Rig) -> None:
    shared = "You are a meticulous assistant. " * 400  # ~12 KB shared system prompt
    async with aiohttp.ClientSession() as http:
        first = await _send(http, rig, _completion(shared + "question 0"))
        later = [await _send(http, rig, _completion(shared + f"question {i}")) for i in range(1, 8)]
    assert later == [first] * len(later)


async def test_subset_hint_and_errors_over_the_wire(rig: Rig) -> None:
    one = rig.keys[2]
    for _ in range(4):
        req = PickRequest("POST", "/v1/completions", {"host": "gw"}, _completion("x"), subset=(one,))
        decision, session = await rig.client.pick(req)
        assert isinstance(decision, Destination) and decision.endpoints == (one,)
        session.aborted("test")
    decision, _ = await rig.client.pick(
        PickRequest("POST", "/v1/completions", {"host": "gw"}, _completion("x"), subset=())
    )
    assert isinstance(decision, Reject) and decision.status == 503
    decision, _ = await rig.client.pick(PickRequest("POST", "/v1/completions", {"host": "gw"}, b"not json"))
    assert isinstance(decision, Reject) and decision.status == 400
    assert json.loads(decision.body)["error"]["type"] == "invalid_request_error"


async def test_the_embedded_picker_decides_at_once_without_flow_control(rig: Rig) -> None:
    assert rig.picker.flow is None and rig.picker.decides_now
    got = rig.picker.pick_now(PickRequest("POST", "/v1/completions", {"host": "gw"}, _completion("now")))
    assert got is not None and isinstance(got[0], Destination) and got[0].endpoints[0] in rig.keys
    got[1].aborted("test")
    bad = rig.picker.pick_now(PickRequest("POST", "/v1/completions", {"host": "gw"}, b"{not json"))
    assert bad is not None and isinstance(bad[0], Reject) and bad[0].status == 400
