"""Running the gateway as a program: signals, uvloop, ``--workers N`` processes on one port.

``--workers N`` starts N worker processes (``spawn``), each a complete gateway (its own event loop, upstream
pools, pickers) listening on the same ``host:port`` with ``SO_REUSEPORT``: the kernel spreads connections over
them, so N workers use N cores. The parent keeps a bound (non-listening) socket on the port so that
``:0`` resolves once for all, forwards SIGINT/SIGTERM to the workers and exits when they have
(:mod:`inferoute.workers`, shared with ``inferoute epp --workers N``).

An *embedded* picker lives in each worker. The workers' pickers share their in-flight counts and prefix
placements through a shared-memory segment (the parent creates it and unlinks it once every worker has it
mapped; ``picker.sync_redis`` replaces it with Redis), so a prefix goes to the same model server whichever
worker takes the request. Flow-control queues stay per worker.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import msgspec

from inferoute.epp.sync.options import SyncOptions
from inferoute.epp.sync.shm import create_segment, unlink_once_mapped, unlink_segment
from inferoute.gateway.app import RunningGateway, start_gateway
from inferoute.gateway.config import EMBEDDED, GatewayConfig, parse_listen, with_listen
from inferoute.gateway.picker_setup import start_embedded_picker
from inferoute.gateway.reload import ConfigWatcher
from inferoute.malloc import freeze_startup_objects
from inferoute.tasks import TaskSet
from inferoute.workers import hold_port, run_workers, worker_init

log = logging.getLogger(__name__)


def run_async(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run ``main`` on uvloop (asyncio if uvloop is missing)."""
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
DEFAULT_GRACE = 5.0
"""Seconds a stopping gateway gives requests in flight (streams included) before cutting them."""


async def wait_for_signal(sigs: tuple[signal.Signals, ...] = STOP_SIGNALS) -> str:
    """Until SIGINT or SIGTERM; returns the signal's name."""
    loop = asyncio.get_running_loop()
    got: asyncio.Future[str] = loop.create_future()

    def on_signal(sig: signal.Signals) -> None:
        if not got.done():
            got.set_result(sig.name)

    for sig in sigs:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return await got
    finally:
        for sig in sigs:
            loop.remove_signal_handler(sig)


async def stop_gracefully(
    gw: RunningGateway, grace: float = DEFAULT_GRACE, sigs: tuple[signal.Signals, ...] = STOP_SIGNALS
) -> None:
    """Close ``gw``, giving requests in flight up to ``grace`` seconds, and say so; a second signal meanwhile
    ends the process at once (exit status 130, no traceback: the kernel closes the sockets). Streams cut
    when the grace period ends are logged with cause ``shutdown``."""
    loop = asyncio.get_running_loop()
    busy = gw.handler.in_flight
    if busy:
        log.warning(
            "stopping: waiting up to %.0f s for %d request(s) in flight (again to stop now)", grace, busy
        )
    else:
        log.info("stopping (no requests in flight)")

    def at_once(sig: signal.Signals) -> None:
        log.warning("%s again: stopping now, cutting %d request(s)", sig.name, gw.handler.in_flight)
        logging.shutdown()
        os._exit(130)

    for sig in sigs:
        loop.add_signal_handler(sig, at_once, sig)
    try:
        await gw.aclose(grace)
    finally:
        for sig in sigs:
            loop.remove_signal_handler(sig)


async def serve_one(
    cfg: GatewayConfig,
    *,
    reuse_port: bool = False,
    announce: bool = True,
    watch: str | None = None,
    sigs: tuple[signal.Signals, ...] = STOP_SIGNALS,
    sync: SyncOptions | None = None,
) -> int:
    """One gateway process until a signal; with ``watch`` (the config file's path) it reloads the file's
    routes when it changes (:mod:`inferoute.gateway.reload`); ``sync``: how its embedded picker shares what
    it learns with the other workers'."""
    factory = functools.partial(start_embedded_picker, sync=sync)
    gw: RunningGateway = await start_gateway(cfg, reuse_port=reuse_port, embedded_factory=factory)
    freeze_startup_objects()
    tasks = TaskSet("gateway")
    stopped = False
    try:
        if watch is not None:
            watcher = ConfigWatcher(watch, gw.reload, gw.registry)
            watcher.prime()
            tasks.spawn(watcher.run(), "watch-config")
        if announce:
            log.info("gateway listening on %s (pid %d)", gw.url, os.getpid())
        name = await wait_for_signal(sigs)
        log.info("%s received", name)
        await tasks.aclose()
        stopped = True
        await stop_gracefully(gw, sigs=sigs)
    finally:
        await tasks.aclose()
        if not stopped:
            await gw.aclose()
    return 0


def _worker_main(
    cfg_json: bytes,
    log_level: int,
    watch: str | None = None,
    parent: int = 0,
    sync: SyncOptions | None = None,
) -> None:
    worker_init(parent, log_level)
    cfg = msgspec.json.decode(cfg_json, type=GatewayConfig)
    only_term = (signal.SIGTERM,)
    sys.exit(
        run_async(
            lambda: serve_one(cfg, reuse_port=True, announce=False, watch=watch, sigs=only_term, sync=sync)
        )
    )


def run_gateway(cfg: GatewayConfig, workers: int | None = None, watch: str | None = None) -> int:
    """Blocking entry point of ``inferoute gateway``: one process, or ``workers`` processes on one port;
    ``watch``: the config file each process reloads when it changes."""
    n = workers or cfg.workers
    if n <= 1:
        return run_async(lambda: serve_one(cfg, watch=watch))
    shared = None
    if cfg.picker.sync_redis is None and any(
        r.epp.enabled and r.epp.endpoint == EMBEDDED for r in cfg.routes
    ):  # the workers' embedded pickers share in-flight load and placements through shared memory
        pc = cfg.picker
        shared = SyncOptions(pc.sync_interval, namespace=pc.pool_name, shm_path=create_segment(n), slots=n)
    try:
        return _run_gateway_workers(cfg, n, watch, shared)
    finally:
        if shared is not None and shared.shm_path is not None:
            unlink_segment(shared.shm_path)


def _run_gateway_workers(cfg: GatewayConfig, n: int, watch: str | None, shared: SyncOptions | None) -> int:
    host, port = parse_listen(cfg.listen)
    holder = hold_port(host, port)
    port = holder.getsockname()[1]
    cfg = with_listen(cfg, f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    blob = msgspec.json.encode(cfg)
    level = logging.getLogger().getEffectiveLevel()

    def started(pids: list[int]) -> None:
        log.info(
            "gateway listening on http://%s:%d with %d workers (pids %s)",
            host,
            port,
            n,
            ",".join(map(str, pids)),
        )
        if shared is not None and shared.shm_path is not None:  # gone as soon as every worker mapped it
            threading.Thread(
                target=unlink_once_mapped, args=(shared.shm_path, n), name="sync-segment", daemon=True
            ).start()

    try:
        return run_workers(
            n,
            _worker_main,
            lambda i: (blob, level, watch, os.getpid(), shared.for_worker(i) if shared else None),
            name="gateway",
            grace=DEFAULT_GRACE,
            started=started,
        )
    finally:
        holder.close()
