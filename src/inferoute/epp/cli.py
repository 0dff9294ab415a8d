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
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import click
import uvloop
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from inferoute.epp.config import BUILTIN_PROFILES
from inferoute.epp.serving.h2core import Limits
from inferoute.epp.serving.server import EppServer, ServerOptions
from inferoute.errors import InferouteError, describe_os_error
from inferoute.httpguard import ConnectionLimits, GuardedSite, serve
from inferoute.malloc import freeze_startup_objects, keep_large_buffers
from inferoute.tasks import TaskSet

if TYPE_CHECKING:
    from inferoute.epp.ha import HaOptions
    from inferoute.epp.sync.options import SyncOptions

log = logging.getLogger(__name__)
PORT = click.IntRange(0, 65535)


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
    discover: bool = False
    """Kubernetes discovery: watch InferencePool ``pool_name`` in ``pool_namespace`` and its pods."""
    pool_namespace: str = "default"
    kubeconfig: str | None = None
    ha: HaOptions | None = None
    """Active-passive leader election on a Lease (None: every replica reports ready)."""
    sync: SyncOptions | None = None
    """In-flight load shared with the other workers / replicas (None: this process's own only)."""
    reuse_port: bool = False
    """A worker of ``--workers N``: share the gRPC ports (``SO_REUSEPORT``); metrics on a private port."""


METRICS_PORT_LIMITS = ConnectionLimits(header_timeout=10.0, idle_timeout=75.0, max_connections=1024)
"""The ``/metrics`` port's connection limits (scrapers and probes need few; see docs/security.md)."""


async def _serve_metrics(
    registry: CollectorRegistry,
    host: str,
    port: int,
    ready: Callable[[], bool] = lambda: True,
    limits: ConnectionLimits = METRICS_PORT_LIMITS,
) -> GuardedSite:
    """``/metrics``, plus ``/healthz`` (alive) and ``/readyz`` (the gRPC readiness: synced, and the leader
    when leader election is on) for HTTP probes, within ``limits``."""

    async def handle(request: web.BaseRequest) -> web.Response:
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405, text="method not allowed\n", headers={"Allow": "GET, HEAD"})
        if request.path == "/metrics":
            return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})
        if request.path == "/healthz":
            return web.Response(text="ok\n")
        if request.path == "/readyz":
            return web.Response(text="ok\n") if ready() else web.Response(status=503, text="not ready\n")
        return web.Response(status=404, text="not found\n")

    try:
        return await serve(handle, host, port, limits, name="epp metrics")
    except OSError as exc:
        msg = f"cannot listen on {host}:{port} (--metrics-port): {describe_os_error(exc)}"
        raise InferouteError(500, msg, cause="bind") from exc


async def _start_picker(opts: EppRunOptions, registry: CollectorRegistry) -> Any:
    from inferoute.epp.assembly import EppOptions, start_picker

    source = None
    if opts.discover:
        from inferoute.epp.datalayer.kubernetes_watch import KubernetesSource

        source = KubernetesSource(opts.pool_name, opts.pool_namespace, kubeconfig=opts.kubeconfig)
    return await start_picker(
        EppOptions(
            config_file=opts.config,
            endpoints_file=None if opts.discover else opts.endpoints,
            source=source,
            profile=opts.profile,
            registry=registry,
            refresh_interval=opts.refresh_interval,
            pool_name=opts.pool_name,
            sync=opts.sync,
        )
    )


def _kubernetes_tasks(opts: EppRunOptions, picker: Any, tasks: TaskSet) -> Any:
    """With ``--pool-name``: objectives/rewrites from their CRDs into the picker's store. With
    ``--ha-enable-leader-election``: run the elector and gate readiness on leading. Returns the picker to
    serve."""
    if opts.discover:
        from inferoute.epp.datalayer.kubernetes_crds import CrdSync
        from inferoute.epp.datalayer.kubernetes_watch import load_kube_config

        sync = CrdSync(
            picker.config.store, opts.pool_name, opts.pool_namespace, load_kube_config(opts.kubeconfig)
        )
        tasks.spawn(sync.run(), name="k8s-crd-sync")
    if opts.ha is None:
        return picker
    from inferoute.clock import SystemClock
    from inferoute.epp.datalayer.kubernetes_watch import load_kube_config
    from inferoute.epp.ha import LeaderGatedPicker, LeaseElector

    elector = LeaseElector(opts.ha, load_kube_config(opts.kubeconfig), SystemClock())
    tasks.spawn(elector.run(), name="leader-election")
    return LeaderGatedPicker(picker, elector.is_leader)


async def run(
    opts: EppRunOptions,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[int, int | None, int], None] | None = None,
) -> None:
    """Start picker, gRPC servers and metrics; run until ``stop`` is set (or a signal arrives).
    ``on_ready(grpc_port, health_port, metrics_port)`` replaces the ready line (a worker tells its parent)."""
    keep_large_buffers()  # big prompts: no mmap/page faults per request (inferoute/malloc.py)
    registry = CollectorRegistry()
    picker = await _start_picker(opts, registry)
    tasks = TaskSet("epp-cli")
    try:
        served = _kubernetes_tasks(opts, picker, tasks)
    except BaseException:
        await tasks.aclose()
        await picker.aclose()
        raise
    server: EppServer | None = None
    runner: GuardedSite | None = None
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        server = await EppServer.start(
            served,
            ServerOptions(
                host=opts.host,
                grpc_port=opts.grpc_port,
                health_port=opts.health_port,
                insecure=opts.insecure,
                cert_path=opts.cert_path,
                client_ca=opts.client_ca,
                transport=opts.transport,
                h2_limits=opts.h2_limits,
                reuse_port=opts.reuse_port,
            ),
            registry,
        )
        if opts.reuse_port:  # a worker: the parent serves the pod's metrics port, from each worker's own
            runner = await _serve_metrics(registry, "127.0.0.1", 0, served.ready)
        else:
            runner = await _serve_metrics(registry, opts.host, opts.metrics_port, served.ready)
        metrics_port = runner.port  # the bound port (0 on the command line: one the OS chose)
        freeze_startup_objects()
        if on_ready is not None:
            on_ready(server.grpc_port, server.health_port, metrics_port)
        else:
            log.info(
                "inferoute epp ready: ext_proc :%d, health :%s, metrics :%d",
                server.grpc_port,
                server.health_port,
                metrics_port,
            )
        await stop.wait()
        _second_signal_stops_now(loop)
        log.warning(
            "stopping: open ext_proc streams get up to %.0f s (--grace) to finish (again to stop now)",
            opts.grace,
        )
    finally:
        if server is not None:
            await server.aclose(opts.grace)
        if runner is not None:
            await runner.aclose()
        await tasks.aclose()  # a leader releases its Lease here
        await picker.aclose()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)


def _second_signal_stops_now(loop: asyncio.AbstractEventLoop) -> None:
    """From now on SIGINT/SIGTERM end the process at once (exit 130, no traceback)."""

    def now(sig: signal.Signals) -> None:
        log.warning("%s again: stopping now", sig.name)
        logging.shutdown()
        os._exit(130)

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, now, sig)


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
@click.option(
    "--profile",
    type=click.Choice(BUILTIN_PROFILES),
    help="A built-in picker profile instead of --config [default: gie-default].",
)
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option(
    "--grpc-port", default=9002, show_default=True, type=PORT, help="ext_proc port (0 = a free port)."
)
@click.option(
    "--health-port", default=9003, show_default=True, type=PORT, help="Plain-text gRPC health port."
)
@click.option("--metrics-port", default=9090, show_default=True, type=PORT, help="Prometheus /metrics port.")
@click.option(
    "--cert-path",
    type=click.Path(exists=True, file_okay=False),
    help="Directory with tls.crt and tls.key (reloaded on change). Default: a self-signed pair kept in "
    "~/.local/state/inferoute/epp-tls (INFEROUTE_STATE_DIR), which gateways on this machine trust.",
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
    type=click.FloatRange(0, min_open=True),
    help="Seconds between scrapes of each endpoint's metrics.",
)
@click.option(
    "--pool-name",
    help="Kubernetes discovery: watch this InferencePool and its Ready pods (instead of --endpoints).",
)
@click.option(
    "--pool-namespace",
    help="The InferencePool's namespace. Default: $NAMESPACE, else the pod's own namespace, else default.",
)
@click.option(
    "--kubeconfig",
    type=click.Path(exists=True, dir_okay=False),
    help="kubeconfig file. Default: in-cluster service account, else $KUBECONFIG, else ~/.kube/config.",
)
@click.option(
    "--ha-enable-leader-election",
    "ha_enable",
    is_flag=True,
    help="Active-passive HA: only the holder of a coordination.k8s.io Lease reports ready.",
)
@click.option("--ha-lease-name", help="The Lease's name. Default: POOL-epp (or inferoute-epp).")
@click.option(
    "--ha-identity", help="This replica's identity in the Lease. Default: $POD_NAME, else host-pid."
)
@click.option(
    "--ha-lease-duration",
    default=2.0,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Seconds a Lease holds without renewal: a standby takes over about this long after the leader dies.",
)
@click.option(
    "--ha-renew-deadline",
    default=1.5,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Seconds a leader may go without renewing before it steps down (below --ha-lease-duration).",
)
@click.option(
    "--ha-retry-period",
    default=0.5,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Seconds between two reads or renewals of the Lease (below --ha-renew-deadline).",
)
@click.option(
    "--grace",
    default=5.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds open ext_proc streams get to finish when the picker stops (Ctrl-C, SIGTERM).",
)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(1, 256),
    help="Picker processes sharing the ports (SO_REUSEPORT); in-flight load shared through shared memory "
    "(docs/picker.md).",
)
@click.option(
    "--sync-redis",
    metavar="URL",
    callback=lambda _c, _p, v: _redis_url(v),
    help="Share in-flight load and prefix placements with every picker replica using this Redis/Valkey "
    "(redis://HOST:PORT/DB or unix:///PATH), across hosts.",
)
@click.option(
    "--sync-interval",
    default=0.2,
    show_default=True,
    type=click.FloatRange(0.01, 10),
    help="Seconds between exchanges (in-flight load, prefix placements) with the other workers/replicas.",
)
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
    pool_name: str | None,
    pool_namespace: str | None,
    kubeconfig: str | None,
    grace: float,
    client_ca: str | None,
    transport: str,
    ha_enable: bool,
    ha_lease_name: str | None,
    ha_identity: str | None,
    ha_lease_duration: float,
    ha_renew_deadline: float,
    ha_retry_period: float,
    workers: int,
    sync_redis: str | None,
    sync_interval: float,
    **h2: Any,
) -> None:
    """Run the endpoint picker (Endpoint Picker Protocol over Envoy ext_proc)."""
    _check_flag_combinations(config, endpoints, profile, pool_name, insecure, cert_path, client_ca)
    _check_dependent_flags(click.get_current_context(), pool_name is not None, ha_enable)
    namespace = pool_namespace or os.environ.get("NAMESPACE") or _own_namespace()
    ha = _ha_options(
        pool_name,
        namespace,
        ha_enable=ha_enable,
        ha_lease_name=ha_lease_name,
        ha_identity=ha_identity,
        ha_lease_duration=ha_lease_duration,
        ha_renew_deadline=ha_renew_deadline,
        ha_retry_period=ha_retry_period,
    )
    opts = EppRunOptions(
        config=config,
        endpoints=endpoints,
        profile=profile,
        host=host,
        grpc_port=grpc_port,
        health_port=health_port,
        metrics_port=metrics_port,
        cert_path=_serving_cert(cert_path, insecure),
        insecure=insecure,
        refresh_interval=refresh_interval,
        pool_name=pool_name or "default",
        grace=grace,
        client_ca=client_ca,
        transport=transport,
        h2_limits=h2_limits(h2),
        discover=pool_name is not None,
        pool_namespace=namespace,
        kubeconfig=kubeconfig,
        ha=ha,
        sync=_sync_options(workers, sync_redis, sync_interval, pool_name or "default"),
    )
    _launch(opts, workers)


def _redis_url(value: str | None) -> str | None:
    from inferoute.epp.sync.options import REDIS_SCHEMES

    if value is not None and not value.startswith(REDIS_SCHEMES):
        raise click.BadParameter(
            f"expected redis://HOST:PORT/DB, rediss://... or unix:///PATH, got {value!r}"
        )
    return value


def _sync_options(workers: int, redis_url: str | None, interval: float, pool: str) -> SyncOptions | None:
    """How in-flight load is shared: Redis when given, shared memory between workers, else not at all."""
    if redis_url is None and workers == 1:
        return None
    from inferoute.epp.sync.options import SyncOptions

    return SyncOptions(interval=interval, redis_url=redis_url, namespace=pool)


def _launch(opts: EppRunOptions, workers: int) -> None:
    """Serve in this process, or as ``workers`` processes (:mod:`inferoute.epp.workers`)."""
    if workers > 1 and opts.ha is not None:
        raise click.UsageError("--workers and --ha-enable-leader-election: leader election needs one process")
    try:
        if workers == 1:
            uvloop.run(run(opts))
            return
        from inferoute.epp.workers import run_epp_workers

        status = run_epp_workers(opts, workers)
    except InferouteError as exc:
        raise click.ClickException(exc.message) from exc
    if status:
        raise SystemExit(status)


def _check_flag_combinations(
    config: str | None,
    endpoints: str | None,
    profile: str | None,
    pool_name: str | None,
    insecure: bool,
    cert_path: str | None,
    client_ca: str | None,
) -> None:
    """Usage errors for flags that exclude or require each other."""
    if insecure and (cert_path or client_ca):
        raise click.UsageError("--cert-path/--client-ca and --insecure-serving are mutually exclusive")
    if profile and config:
        raise click.UsageError(
            "--profile and --config are alternatives: give one (--profile picks a built-in)"
        )
    if (endpoints is None) == (pool_name is None):
        raise click.UsageError(
            "give either --endpoints FILE (static endpoints) or --pool-name NAME (Kubernetes InferencePool)"
        )


def _check_dependent_flags(ctx: click.Context, discover: bool, ha_enable: bool) -> None:
    """Flags that mean nothing without the flag they belong to are mistakes, not silently ignored."""
    given = [
        p.opts[0]
        for p in ctx.command.params
        if p.name and ctx.get_parameter_source(p.name) is click.core.ParameterSource.COMMANDLINE
    ]
    for flag in given:
        if flag.startswith("--ha-") and flag != "--ha-enable-leader-election" and not ha_enable:
            raise click.UsageError(f"{flag} needs --ha-enable-leader-election")
        if flag in ("--pool-namespace", "--kubeconfig") and not (discover or ha_enable):
            raise click.UsageError(f"{flag} needs --pool-name or --ha-enable-leader-election (Kubernetes)")


def _serving_cert(cert_path: str | None, insecure: bool) -> str | None:
    """The certificate directory to serve: ``--cert-path``, else (with TLS) the local self-signed pair."""
    if cert_path is not None or insecure:
        return cert_path
    from inferoute.epp.serving.tls import ensure_local_cert

    local = str(ensure_local_cert())
    log.info(
        "TLS: the self-signed certificate %s/tls.crt; gateways on this machine trust it, elsewhere set "
        "epp.ca_file to a copy (or serve a real one with --cert-path)",
        local,
    )
    return local


def _own_namespace() -> str:
    """The pod's namespace (from its service account) in a cluster, else ``default``."""
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
            return f.read().strip() or "default"
    except OSError:
        return "default"


def _ha_options(
    pool_name: str | None,
    namespace: str,
    *,
    ha_enable: bool,
    ha_lease_name: str | None,
    ha_identity: str | None,
    ha_lease_duration: float,
    ha_renew_deadline: float,
    ha_retry_period: float,
) -> HaOptions | None:
    if not ha_enable:
        return None
    from inferoute.epp.ha import HaOptions

    ha = HaOptions(
        lease_name=ha_lease_name or f"{pool_name or 'inferoute'}-epp",
        namespace=namespace,
        identity=ha_identity or os.environ.get("POD_NAME") or f"{os.uname().nodename}-{os.getpid()}",
        lease_duration=ha_lease_duration,
        renew_deadline=ha_renew_deadline,
        retry_period=ha_retry_period,
    )
    problem = ha.check()
    if problem:
        raise click.UsageError(problem)
    return ha
