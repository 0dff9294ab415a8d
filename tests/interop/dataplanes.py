"""The three ways a request reaches the picker, as context managers yielding the client-facing URL and the
picker: the embedded gateway, the gateway with ``inferoute epp`` over gRPC, and real Envoy with
``inferoute epp`` (both ``inferoute epp`` modes on the default h2 transport)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from inferoute.epp.assembly import EmbeddedPicker, EppOptions, start_picker
from inferoute.epp.serving.server import EppServer, ServerOptions
from inferoute.gateway.app import start_gateway
from inferoute.gateway.config import parse_config
from inferoute.integrations.envoy import EnvoyProcess, bootstrap
from inferoute.sim import SimPool

Plane = Callable[[SimPool, str, Path], contextlib.AbstractAsyncContextManager[tuple[str, CollectorRegistry]]]


def _gateway_config(pool: SimPool, picker_yaml: str, epp: dict[str, Any]) -> Any:
    endpoints = [{"name": e.name, "address": e.address, "port": e.port} for e in pool.endpoints]
    return parse_config(
        {
            "listen": "127.0.0.1:0",
            "pool": {"endpoints": endpoints},
            "picker": {"config_text": picker_yaml},
            "routes": [{"path": "/", "epp": epp}],
        }
    )


@contextlib.asynccontextmanager
async def embedded(
    pool: SimPool, picker_yaml: str, tmp: Path
) -> AsyncIterator[tuple[str, CollectorRegistry]]:
    reg = CollectorRegistry()
    gw = await start_gateway(_gateway_config(pool, picker_yaml, {"endpoint": "embedded"}), registry=reg)
    try:
        yield gw.url, reg
    finally:
        await gw.aclose(grace=1.0)


@contextlib.asynccontextmanager
async def picker_server(
    pool: SimPool, picker_yaml: str, *, insecure: bool
) -> AsyncIterator[tuple[EppServer, EmbeddedPicker]]:
    picker = await start_picker(
        EppOptions(endpoints=pool.endpoints, registry=CollectorRegistry(), seed=3, config_text=picker_yaml)
    )
    opts = ServerOptions(host="127.0.0.1", grpc_port=0, health_port=None, insecure=insecure)
    server = await EppServer.start(picker, opts, CollectorRegistry())
    try:
        yield server, picker
    finally:
        await server.aclose(0)
        await picker.aclose()


@contextlib.asynccontextmanager
async def over_grpc(
    pool: SimPool, picker_yaml: str, tmp: Path
) -> AsyncIterator[tuple[str, CollectorRegistry]]:
    async with picker_server(pool, picker_yaml, insecure=True) as (server, picker):
        epp = {"endpoint": f"http://127.0.0.1:{server.grpc_port}", "timeout_ms": 10000}
        gw = await start_gateway(_gateway_config(pool, picker_yaml, epp), registry=CollectorRegistry())
        try:
            yield gw.url, picker.metrics.registry
        finally:
            await gw.aclose(grace=1.0)


@contextlib.asynccontextmanager
async def envoy(pool: SimPool, picker_yaml: str, tmp: Path) -> AsyncIterator[tuple[str, CollectorRegistry]]:
    async with picker_server(pool, picker_yaml, insecure=False) as (server, picker):  # Envoy speaks TLS
        cfg = bootstrap(
            f"127.0.0.1:{server.grpc_port}",
            0,
            admin_port=0,
            listen_address="127.0.0.1",
            health_check_interval=0.5,
        )
        proxy = await EnvoyProcess.start(cfg, str(tmp))
        try:
            await proxy.wait_ready(30)
            yield f"http://127.0.0.1:{await proxy.listener_port()}", picker.metrics.registry
        finally:
            await proxy.aclose()


PLANES: dict[str, Plane] = {"embedded": embedded, "grpc": over_grpc, "envoy": envoy}
