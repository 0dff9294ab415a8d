"""N worker processes serving one port: what ``inferoute gateway --workers N`` and
``inferoute epp --workers N`` share.

The parent binds the port once (a bound, non-listening ``SO_REUSEPORT`` socket, :func:`hold_port`), so ``:0``
resolves once for all, then starts N ``spawn`` processes that each listen on that port with ``SO_REUSEPORT``:
the kernel spreads connections over them, so N workers use N cores. The parent forwards SIGINT/SIGTERM to the
workers (one SIGTERM each), stops the others when one dies on its own, and exits when they have. Workers
ignore SIGINT themselves (a Ctrl-C reaches the whole process group; the parent turns it into one SIGTERM per
worker) and die with their parent however it dies (:func:`die_with_parent`), so no worker keeps serving the
port alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import os
import signal
import socket
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)


def hold_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with ``SO_REUSEPORT`` and not listening: it keeps the port (``0``
    resolved to a free one, read back with ``getsockname``) for the workers, which bind it too."""
    holder = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind((host, port))
    except OSError:
        holder.close()
        raise
    return holder


def die_with_parent(parent: int) -> None:
    """Linux: the kernel sends this process SIGTERM when its parent dies, however it dies (SIGKILL included)
    (``prctl(PR_SET_PDEATHSIG)``)."""
    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def worker_init(parent: int, log_level: int) -> None:
    """First thing in a worker: logging like the parent's (with the process name), SIGINT ignored (the parent
    forwards one SIGTERM per Ctrl-C, else it would count twice and skip the grace period), and death with
    the parent."""
    logging.basicConfig(
        level=log_level, format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"
    )
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if parent:
        die_with_parent(parent)


def run_workers(
    n: int,
    target: Callable[..., Any],
    args: Callable[[int], Sequence[Any]],
    *,
    name: str,
    grace: float,
    started: Callable[[list[int]], None] = lambda _pids: None,
) -> int:
    """Run ``target(*args(i))`` in ``n`` spawned processes named ``NAME-worker-I`` until a signal or until one
    of them exits; ``started(pids)`` runs in the parent once all are started (announce, serve what the parent
    serves). Returns 0 after a signal, else the first failed worker's exit status (128 + S when killed by
    signal S)."""
    ctx = multiprocessing.get_context("spawn")
    procs: list[multiprocessing.process.BaseProcess] = []
    stop = {"signal": 0, "stopping": 0}

    def forward(signum: int, frame: Any) -> None:
        if frame is not None:  # a real signal (else: a worker exited on its own)
            if not stop["signal"]:
                log.warning(
                    "stopping %d workers: each waits up to %.0f s for its requests in flight (again to stop "
                    "now)",
                    n,
                    grace,
                )
            else:
                log.warning("%s again: the workers stop now", signal.Signals(signum).name)
            stop["signal"] = signum
        stop["stopping"] = 1
        for p in procs:
            if p.is_alive() and p.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGTERM)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for i in range(n):
            proc = ctx.Process(target=target, args=tuple(args(i)), name=f"{name}-worker-{i}")
            proc.start()
            procs.append(proc)
        started([p.pid or 0 for p in procs])
        running = {p.sentinel: p for p in procs}
        codes = []
        while running:
            for ended in multiprocessing.connection.wait(list(running)):
                p = running.pop(ended)  # type: ignore[arg-type]
                p.join()
                codes.append(p.exitcode or 0)
                if not stop["stopping"]:  # a worker exited on its own: stop the others too
                    log.warning("%s exited (status %s): stopping the other workers", p.name, p.exitcode)
                    forward(signal.SIGTERM, None)
        if stop["signal"]:
            return 0
        failed = [c if c > 0 else 128 - c for c in codes if c]  # killed by signal S: 128 + S
        return failed[0] if failed else 0
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        for s, h in old.items():
            signal.signal(s, h)
