"""``inferoute epp``: run the endpoint picker as an ext_proc gRPC server (Envoy / any GIE gateway in front).

Wires :func:`inferoute.epp.assembly.start_picker` to :class:`inferoute.epp.serving.server.EppServer`, serves
Prometheus metrics (the picker's registry plus the ext_proc counters) on ``--metrics-port``, and stops
cleanly on SIGINT / SIGTERM: stop accepting streams, give open ones a grace period, close the picker.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import click
import uvloop
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from inferoute.epp.serving.h2core import Limits
from inferoute.epp.serving.server import EppServer, ServerOptions
from inferoute.errors import InferouteError
from inferoute.malloc import keep_large_buffers

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EppRunOptions:
    """Command-line options of ``inferoute epp``."""

    config: str | None
    endpoints: str | None
    profile: str | None
    host: str
    grpc_port: int
    health_port: int
    metrics_port: int
    cert_path: str | None
    insecure: bool
    refresh_interval: float
    pool_name: str
    grace: float
    client_ca: str | None = None
    transport: str = "h2"
    h2_limits: Limits = field(default_factory=Limits)


async def _serve_metrics(registry: CollectorRegistry, host: str, port: int) -> web.AppRunner:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


async def run(opts: EppRunOptions, stop: asyncio.Event | None = None) -> None:
    """Start picker, gRPC servers and metrics; run until ``stop`` is set (or a signal arrives)."""
    from inferoute.epp.assembly import EppOptions, start_picker

    keep_large_buffers()  # big prompts: no mmap/page faults per request (inferoute/malloc.py)
    registry = CollectorRegistry()
    picker = await start_picker(
        EppOptions(
            config_file=opts.config,
            endpoints_file=opts.endpoints,
            profile=opts.profile,
            registry=registry,
            refresh_interval=opts.refresh_interval,
            pool_name=opts.pool_name,
        )
    )
    server: EppServer | None = None
    runner: web.AppRunner | None = None
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        server = await EppServer.start(
            picker,
            ServerOptions(
                host=opts.host,
                grpc_port=opts.grpc_port,
                health_port=opts.health_port,
                insecure=opts.insecure,
                cert_path=opts.cert_path,
                client_ca=opts.client_ca,
                transport=opts.transport,
                h2_limits=opts.h2_limits,
            ),
            registry,
        )
        runner = await _serve_metrics(registry, opts.host, opts.metrics_port)
        log.info(
            "inferoute epp ready: ext_proc :%d, health :%s, metrics :%d",
            server.grpc_port,
            server.health_port,
            opts.metrics_port,
        )
        await stop.wait()
        log.info("shutting down")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
        if server is not None:
            await server.aclose(opts.grace)
        if runner is not None:
            await runner.cleanup()
        await picker.aclose()


def h2_limit_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """One ``--h2-NAME`` flag per field of :class:`~inferoute.epp.serving.h2core.Limits` (the HTTP/2
    server's limits, docs/security.md); unset flags keep the default."""
    for fld in reversed(dataclasses.fields(Limits)):
        f = click.option(
            "--h2-" + fld.name.replace("_", "-"),
            "h2_" + fld.name,
            type=type(fld.default),
            default=None,
            help=f"HTTP/2 server limit (default {fld.default}; see docs/security.md).",
        )(f)
    return f


def h2_limits(values: dict[str, Any]) -> Limits:
    """The :class:`Limits` from the ``h2_*`` flag values given (None: the default)."""
    chosen = {k[3:]: v for k, v in values.items() if k.startswith("h2_") and v is not None}
    bad = [k for k, v in chosen.items() if v <= 0]
    if bad:
        raise click.UsageError(f"--h2-{bad[0].replace('_', '-')} must be positive")
    return Limits(**chosen)


@click.command(name="epp")
@click.option("--config", type=click.Path(exists=True, dir_okay=False), help="EndpointPickerConfig YAML.")
@click.option(
    "--endpoints",
    type=click.Path(exists=True, dir_okay=False),
    help="Endpoints YAML (endpoints: [{name, address, port, labels}]), re-read when it changes.",
)
@click.option("--profile", help="A built-in profile instead of --config (gie-default, round-robin, ...).")
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option("--grpc-port", default=9002, show_default=True, type=int, help="ext_proc port.")
@click.option("--health-port", default=9003, show_default=True, type=int, help="Plain-text gRPC health port.")
@click.option("--metrics-port", default=9090, show_default=True, type=int, help="Prometheus /metrics port.")
@click.option(
    "--cert-path",
    type=click.Path(exists=True, file_okay=False),
    help="Directory with tls.crt and tls.key (reloaded on change). Default: self-signed.",
)
@click.option("--insecure-serving", "insecure", is_flag=True, help="Serve ext_proc in plain text.")
@click.option(
    "--client-ca",
    type=click.Path(exists=True, dir_okay=False),
    help="PEM CA bundle: require client certificates signed by it (mTLS; reloaded on change).",
)
@click.option(
    "--grpc-transport",
    "transport",
    type=click.Choice(["h2", "grpcio"]),
    default="h2",
    show_default=True,
    help="gRPC server: inferoute's HTTP/2 server (h2, ~6x the decisions per core) or grpc.aio.",
)
@click.option(
    "--refresh-metrics-interval",
    "refresh_interval",
    default=0.05,
    show_default=True,
    type=float,
    help="Seconds between scrapes of each endpoint's metrics.",
)
@click.option("--pool-name", default="default", show_default=True)
@click.option("--grace", default=5.0, show_default=True, type=float, help="Shutdown grace period (s).")
@h2_limit_options
def command(
    config: str | None,
    endpoints: str | None,
    profile: str | None,
    host: str,
    grpc_port: int,
    health_port: int,
    metrics_port: int,
    cert_path: str | None,
    insecure: bool,
    refresh_interval: float,
    pool_name: str,
    grace: float,
    client_ca: str | None,
    transport: str,
    **h2: Any,
) -> None:
    """Run the endpoint picker (Endpoint Picker Protocol over Envoy ext_proc)."""
    if insecure and (cert_path or client_ca):
        raise click.UsageError("--cert-path/--client-ca and --insecure-serving are mutually exclusive")
    if endpoints is None:
        raise click.UsageError("--endpoints FILE is required (static endpoint discovery)")
    opts = EppRunOptions(
        config,
        endpoints,
        profile,
        host,
        grpc_port,
        health_port,
        metrics_port,
        cert_path,
        insecure,
        refresh_interval,
        pool_name,
        grace,
        client_ca,
        transport,
        h2_limits(h2),
    )
    try:
        uvloop.run(run(opts))
    except InferouteError as exc:
        raise click.ClickException(str(exc)) from exc
