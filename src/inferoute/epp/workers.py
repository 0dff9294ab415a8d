"""``inferoute epp --workers N``: N picker processes behind one ext_proc port, one health port and one
metrics port.

The process model is the gateway's (:mod:`inferoute.workers`): the parent holds the gRPC and health ports and
N ``spawn`` workers listen on them with ``SO_REUSEPORT`` (the kernel spreads *connections*, so a proxy with
one HTTP/2 connection reaches one worker: Envoy opens one per worker thread, ``inferoute gateway`` one per
gateway worker). Workers die with their parent.

Each worker is a complete picker: its own datastore scraping every endpoint, its own KV-event subscribers
(every worker subscribes to every endpoint and replays what it missed, so all converge to the same precise
prefix index), and a :class:`~inferoute.epp.sync.inflight.SyncedLearnedState` that shares its in-flight counts
with the other workers through shared memory (or Redis with ``--sync-redis``, which also reaches replicas on
other hosts).

Metrics: each worker serves its registry on a private loopback port; the parent serves ``--metrics-port``
(``/metrics`` = every worker's series with a ``worker`` label added, so ``sum without (worker)`` gives the
pod's figure; ``/readyz`` = 200 when every worker is ready; ``/healthz``).
"""

from __future__ import annotations

import contextlib
import http.server
import logging
import multiprocessing
import os
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from inferoute.epp.sync.options import SyncOptions
from inferoute.errors import InferouteError, describe_os_error
from inferoute.workers import hold_port, run_workers, worker_init

if TYPE_CHECKING:
    from inferoute.epp.cli import EppRunOptions

log = logging.getLogger(__name__)

SCRAPE_TIMEOUT = 2.0


def _worker_main(opts: EppRunOptions, index: int, ready: Any, parent: int, level: int) -> None:
    worker_init(parent, level)
    import uvloop

    from inferoute.epp.cli import run

    def on_ready(grpc_port: int, health_port: int | None, metrics_port: int) -> None:
        ready.put((index, os.getpid(), grpc_port, health_port, metrics_port))

    try:
        uvloop.run(run(opts, on_ready=on_ready))
    except InferouteError as exc:
        log.error("%s", exc.message)
        sys.exit(1)


class WorkerMetrics:
    """Collects every worker's ``/metrics`` (each sample gets a ``worker`` label)."""

    def __init__(self) -> None:
        self.ports: dict[int, int] = {}
        """worker index -> its private metrics port."""

    def describe(self) -> list[Metric]:
        return []  # not collected at registration

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for index, port in sorted(self.ports.items()):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=SCRAPE_TIMEOUT) as r:
                    text = r.read().decode()
            except (OSError, urllib.error.URLError) as exc:
                log.warning("worker %d's metrics: %s", index, exc)
                continue
            for fam in text_string_to_metric_families(text):
                into = families.get(fam.name)
                if into is None:
                    into = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                into.samples += [
                    Sample(s.name, {**s.labels, "worker": str(index)}, s.value, s.timestamp, s.exemplar)
                    for s in fam.samples
                ]
        yield from families.values()

    def ready(self, n: int) -> bool:
        if len(self.ports) < n:
            return False
        for port in self.ports.values():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=SCRAPE_TIMEOUT) as r:
                    if r.status != 200:
                        return False
            except (OSError, urllib.error.URLError):
                return False
        return True


def _metrics_server(host: str, port: int, workers: WorkerMetrics, n: int) -> http.server.ThreadingHTTPServer:
    registry = CollectorRegistry()
    registry.register(workers)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/metrics"):
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif self.path.startswith("/readyz"):
                ok = workers.ready(n)
                self._send(200 if ok else 503, b"ok\n" if ok else b"not ready\n")
            elif self.path.startswith("/healthz"):
                self._send(200, b"ok\n")
            else:
                self._send(404, b"not found\n")

        def _send(self, status: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    try:
        server = http.server.ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:
        msg = f"cannot listen on {host}:{port} (--metrics-port): {describe_os_error(exc)}"
        raise InferouteError(500, msg, cause="bind") from exc
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="epp-metrics", daemon=True).start()
    return server


def _hold(host: str, port: int, flag: str) -> Any:
    try:
        return hold_port(host, port)
    except OSError as exc:
        raise InferouteError(
            500, f"cannot listen on {host}:{port} ({flag}): {describe_os_error(exc)}", cause="bind"
        ) from exc


def run_epp_workers(opts: EppRunOptions, n: int) -> int:
    """Blocking: ``n`` picker workers on ``opts``'s ports until a signal; returns the exit status."""
    from inferoute.epp.sync.shm import create_segment, unlink_segment

    with contextlib.ExitStack() as stack:
        grpc_sock = stack.enter_context(_hold(opts.host, opts.grpc_port, "--grpc-port"))
        health_sock = stack.enter_context(_hold(opts.host, opts.health_port, "--health-port"))
        grpc_port, health_port = grpc_sock.getsockname()[1], health_sock.getsockname()[1]
        sync = opts.sync
        segment = None
        if sync is None or sync.redis_url is None:
            segment = create_segment(n)
            stack.callback(unlink_segment, segment)
            sync = replace(sync or SyncOptions(), shm_path=segment, slots=n)
        workers = WorkerMetrics()
        server = _metrics_server(opts.host, opts.metrics_port, workers, n)
        stack.callback(server.server_close)
        stack.callback(server.shutdown)
        metrics_port = server.server_address[1]
        base = replace(opts, grpc_port=grpc_port, health_port=health_port, reuse_port=True)
        ready = multiprocessing.get_context("spawn").SimpleQueue()
        level = logging.getLogger().getEffectiveLevel()

        def collect(pids: list[int]) -> None:
            seen: list[int] = []
            while len(seen) < n:
                index, pid, *_ports, worker_metrics = ready.get()
                workers.ports[index] = worker_metrics
                seen.append(pid)
            if segment is not None:  # every worker has it mapped: nothing left behind even after a SIGKILL
                unlink_segment(segment)
            log.info(
                "inferoute epp ready: ext_proc :%d, health :%s, metrics :%d (%d workers, pids %s)",
                grpc_port,
                health_port,
                metrics_port,
                n,
                ",".join(map(str, pids)),
            )

        def started(pids: list[int]) -> None:
            threading.Thread(target=collect, args=(pids,), name="epp-workers-ready", daemon=True).start()

        return run_workers(
            n,
            _worker_main,
            lambda i: (replace(base, sync=sync.for_worker(i)), i, ready, os.getpid(), level),
            name="epp",
            grace=opts.grace,
            started=started,
        )
