"""Active-passive HA: two ``inferoute epp`` replicas (in process) discover one InferencePool from the
Kubernetes API emulator and elect a leader on a Lease; only the leader is ready (gRPC health and /readyz),
the standby still routes a request that reaches it, and the standby takes over when the leader stops."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import kmock
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inferoute.epp.cli import EppRunOptions, run
from inferoute.epp.ha import HaOptions
from inferoute.extproc.client import ChannelOptions, GrpcPicker
from inferoute.picking import Destination, PickRequest
from kube_emulator import PODS_URL, POOLS_URL, KubeApi, kube_api, pod, pool

REPLICA: contextvars.ContextVar[str] = contextvars.ContextVar("replica", default="")


class _ReadyLine(logging.Handler):
    """Reads the bound ports from a replica's "inferoute epp ready" line (the replicas run in this process,
    each in a task that carries its name in :data:`REPLICA`)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name, self.ports = name, asyncio.get_running_loop().create_future()

    def emit(self, record: logging.LogRecord) -> None:
        if (
            REPLICA.get() == self.name
            and record.msg.startswith("inferoute epp ready")
            and not self.ports.done()
        ):
            self.ports.set_result(tuple(int(p) for p in record.args))  # type: ignore[union-attr]


class Replica:
    def __init__(self, name: str, api: KubeApi) -> None:
        self.name = name
        self.grpc_port = self.health_port = self.metrics_port = 0  # bound ports, known once started
        self.ready_line = _ReadyLine(name)
        self.stop = asyncio.Event()
        self.opts = EppRunOptions(
            None, None, "round-robin", "127.0.0.1", 0, 0, 0,
            None, True, 0.05, "pool", 1.0,
            discover=True, pool_namespace="default", kubeconfig=str(api.kubeconfig),
            ha=HaOptions("pool-epp", "default", name, lease_duration=1, renew_deadline=0.6, retry_period=0.2),
        )  # fmt: skip
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        logger = logging.getLogger("inferoute.epp.cli")
        logger.setLevel(logging.INFO)  # the ready line is an INFO record
        logger.addHandler(self.ready_line)
        token = REPLICA.set(self.name)
        try:
            self.task = asyncio.create_task(run(self.opts, self.stop))  # the task copies the context
        finally:
            REPLICA.reset(token)

    async def bound(self) -> None:
        """Until the replica said which ports it bound."""
        ports = await asyncio.wait_for(asyncio.shield(self.ready_line.ports), 30)
        self.grpc_port, self.health_port, self.metrics_port = ports

    async def readyz(self) -> bool:
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{self.metrics_port}/readyz") as r:
            return r.status == 200

    async def grpc_ready(self) -> bool:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.health_port}") as ch:
            resp = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="readiness"), timeout=1
            )
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

    async def ready(self) -> bool | None:
        """Both probes' answer; None while leadership changes between them (the probes are two requests, so
        they may straddle a takeover: they must agree only when gRPC says the same before and after)."""
        if not self.ready_line.ports.done():
            return False
        if not self.metrics_port:
            await self.bound()
        with contextlib.suppress(aiohttp.ClientError, grpc.aio.AioRpcError):
            before, http, after = await self.grpc_ready(), await self.readyz(), await self.grpc_ready()
            if before != after:
                return None
            assert http == before, f"{self.name}: /readyz {http} but gRPC readiness {before}"
            return http
        return False

    async def close(self) -> None:
        logger = logging.getLogger("inferoute.epp.cli")
        logger.removeHandler(self.ready_line)
        if not any(isinstance(h, _ReadyLine) for h in logger.handlers):
            logger.setLevel(logging.NOTSET)  # as before the first replica started
        self.stop.set()
        if self.task is not None:
            await self.task


async def wait_for(replica: Replica, ready: bool, deadline: float) -> float:
    start = time.monotonic()
    async with asyncio.timeout(deadline):
        while await replica.ready() != ready:  # noqa: ASYNC110 (polling the probes, as a kubelet does)
            await asyncio.sleep(0.02)
    return time.monotonic() - start


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[KubeApi]:
    async with kube_api(tmp_path) as api:
        await api.create(POOLS_URL, pool(ports=(1,)))  # nothing listens: scrapes fail fast, which is enough
        await api.create(PODS_URL, pod("a", "127.0.0.1"))
        yield api


async def test_only_the_leader_is_ready_and_the_standby_takes_over(api: KubeApi) -> None:
    a, b = Replica("replica-a", api), Replica("replica-b", api)
    a.start()
    try:
        await wait_for(a, True, 5)
        b.start()
        await asyncio.sleep(1.5)  # more than a lease duration: b must still be a standby
        assert await a.ready() is True and await b.ready() is False
        # the standby routes a request that reaches it
        await b.bound()
        picker = GrpcPicker(ChannelOptions(f"127.0.0.1:{b.grpc_port}", tls=False), timeout_ms=5000)
        try:
            body = b'{"model":"m","prompt":"hi"}'
            decision, session = await picker.pick(PickRequest("POST", "/v1/completions", {"host": "x"}, body))
            assert isinstance(decision, Destination) and decision.endpoints[0] == "127.0.0.1:1"
            session.aborted("test")
        finally:
            await picker.aclose()
        await a.close()  # a clean stop releases the Lease
        took = await wait_for(b, True, 3)
        assert took < 1.0, f"takeover after a released lease took {took:.2f} s"
    finally:
        await a.close()
        await b.close()
    lease = api.handler.objects[kmock.resource("coordination.k8s.io/v1/leases"), "default", "pool-epp"].raw
    assert lease["spec"]["holderIdentity"] == ""  # b released it when it stopped
    assert lease["spec"]["leaseTransitions"] >= 1
