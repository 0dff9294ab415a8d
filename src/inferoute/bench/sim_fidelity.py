"""``inferoute bench sim``: how faithfully the simulator keeps its own token schedule under load.

Set-up. The simulator runs in its own process (``inferoute sim --emit-schedule``), pinned to one CPU when the
machine has two or more; this process is the client, pinned to the other CPUs. For each level N of
concurrent streams the client opens N keep-alive connections, spread over the replicas, and sends streaming
completions back to back on each (``ignore_eos``, fixed ``max_tokens``) for ``--warmup`` + ``--duration``
seconds.

Clocks. Every streamed chunk carries ``sim_scheduled_at`` (the engine's planned time for that token) and
``sim_written_at`` (when the server wrote it), CLOCK_MONOTONIC seconds, one clock for all processes on Linux.
The client reads with ``recvmsg`` and ``SO_TIMESTAMPNS``, so each read carries the kernel's receive time
(converted from CLOCK_REALTIME to CLOCK_MONOTONIC with an offset taken at start) besides the time the client
process got to it. Per token, over the tokens scheduled inside the measured window:

* delay  = kernel arrival - scheduled  (what the issue asks: the token's lateness when it reaches the client)
* server = written - scheduled         (the simulator's own lateness: timer and event-loop scheduling)
* client = user-space arrival - scheduled (adds the benchmark client's own processing; reported for honesty)

The sweep reports percentiles, the simulator's CPU use (from /proc) and the largest N whose p99 delay stays
under the target (5 ms by default).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import select
import selectors
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from inferoute.bench.stats import percentile
from inferoute.cliparams import int_list, out_file

_SCHED = re.compile(rb'"sim_scheduled_at":([0-9.]+),"sim_written_at":([0-9.]+)')
_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux value; Python does not always export it
_TIMESPEC = struct.Struct("@qq")

Read = tuple[float, float, bytes]
"""(kernel receive time, user-space receive time, bytes), CLOCK_MONOTONIC seconds."""
Stamp = tuple[float, float, float, float]
"""(kernel arrival, user arrival, scheduled, written) of one token."""


def token_stamps(reads: Sequence[Read]) -> list[Stamp]:
    """Per-token stamps from the timestamped raw reads of one connection (HTTP framing included).

    A token arrives with the read that completed its line (an SSE event can straddle two reads).
    """
    out: list[Stamp] = []
    pending = b""
    for kernel, user, data in reads:
        pending += data
        cut = pending.rfind(b"\n")
        if cut < 0:
            continue
        complete, pending = pending[: cut + 1], pending[cut + 1 :]
        for m in _SCHED.finditer(complete):
            out.append((kernel, user, float(m.group(1)), float(m.group(2))))
    return out


@dataclass(slots=True)
class Level:
    """Figures of one level of concurrency (delays in milliseconds)."""

    streams: int
    tokens: int = 0
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    delay_p50_ms: float = math.nan
    delay_p90_ms: float = math.nan
    delay_p99_ms: float = math.nan
    delay_max_ms: float = math.nan
    server_p50_ms: float = math.nan
    server_p99_ms: float = math.nan
    client_p99_ms: float = math.nan
    sim_cpu_pct: float = math.nan


def summarize(
    streams: int,
    stamps: Sequence[Stamp],
    window: tuple[float, float],
    requests: int,
    errors: int,
    sim_cpu_pct: float,
) -> Level:
    """Reduce per-token stamps to a :class:`Level`, keeping tokens scheduled inside ``window``."""
    start, end = window
    kept = [s for s in stamps if start <= s[2] <= end]
    delay = sorted((k - s) * 1000 for k, _, s, _ in kept)
    server = sorted((w - s) * 1000 for _, _, s, w in kept)
    client = sorted((u - s) * 1000 for _, u, s, _ in kept)
    seconds = end - start
    return Level(
        streams=streams,
        tokens=len(kept),
        requests=requests,
        errors=errors,
        seconds=round(seconds, 2),
        tokens_per_s=round(len(kept) / seconds, 1) if seconds > 0 else math.nan,
        delay_p50_ms=percentile(delay, 50),
        delay_p90_ms=percentile(delay, 90),
        delay_p99_ms=percentile(delay, 99),
        delay_max_ms=delay[-1] if delay else math.nan,
        server_p50_ms=percentile(server, 50),
        server_p99_ms=percentile(server, 99),
        client_p99_ms=percentile(client, 99),
        sim_cpu_pct=sim_cpu_pct,
    )


def max_sustained(levels: Sequence[Level], target_ms: float) -> int:
    """The largest stream count whose p99 delay is under ``target_ms`` with no errors (0 if none)."""
    ok = [lv.streams for lv in levels if lv.delay_p99_ms < target_ms and lv.errors == 0 and lv.tokens > 0]
    return max(ok, default=0)


def markdown(levels: Sequence[Level], target_ms: float) -> str:
    """A Markdown table of the sweep."""
    rows = [
        "| streams | tokens/s | delay p50 | p90 | p99 | max | server p50 | server p99 | client p99"
        " | sim CPU | errors |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lv in levels:
        mark = "" if lv.delay_p99_ms < target_ms else " ✗"
        rows.append(
            f"| {lv.streams} | {lv.tokens_per_s:,.0f} | {lv.delay_p50_ms:.2f} | {lv.delay_p90_ms:.2f}"
            f" | {lv.delay_p99_ms:.2f}{mark} | {lv.delay_max_ms:.1f} | {lv.server_p50_ms:.2f}"
            f" | {lv.server_p99_ms:.2f} | {lv.client_p99_ms:.2f} | {lv.sim_cpu_pct:.0f}% | {lv.errors} |"
        )
    return "\n".join(rows) + "\n\n(delays in ms)"


# -- I/O --------------------------------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Conn:
    """One keep-alive connection sending streaming completions back to back."""

    __slots__ = ("errors", "first", "reads", "request", "requests", "sock", "tail")

    def __init__(self, sock: socket.socket, request: bytes) -> None:
        self.sock = sock
        self.request = request
        self.reads: list[Read] = []
        self.tail = b""
        self.first = True
        self.requests = 0
        self.errors = 0
        sock.sendall(request)

    def on_readable(self, realtime_to_monotonic: float, ancsize: int) -> bool:
        """Read once; False when the server closed the connection."""
        try:
            data, anc, _, _ = self.sock.recvmsg(1 << 16, ancsize)
        except BlockingIOError:
            return True
        user = time.monotonic()
        if not data:
            return False
        kernel = user
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(payload) >= _TIMESPEC.size:
                sec, nsec = _TIMESPEC.unpack_from(payload)
                kernel = sec + nsec * 1e-9 - realtime_to_monotonic
        self.reads.append((kernel, user, data))
        if self.first:
            self.first = False
            if not data.startswith(b"HTTP/1.1 200"):
                self.errors += 1
        tail = (self.tail + data[-16:])[-16:]
        self.tail = tail
        if tail.endswith(b"\r\n0\r\n\r\n"):  # end of the chunked body: next request on this connection
            self.requests += 1
            self.tail = b""
            self.first = True
            self.sock.sendall(self.request)
        return True


def _request(host: str, model: str, max_tokens: int, ident: int) -> bytes:
    body = json.dumps(
        {
            "model": model,
            "prompt": f"fidelity stream {ident}",
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "stream": True,
        }
    ).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def run_level(
    addrs: Sequence[tuple[str, int]],
    pid: int,
    model: str,
    streams: int,
    duration: float,
    warmup: float,
    max_tokens: int,
) -> Level:
    """Drive ``streams`` connections for ``warmup + duration`` seconds and summarise the measured part."""
    ancsize = socket.CMSG_SPACE(_TIMESPEC.size)
    offset = time.time() - time.monotonic()
    sel = selectors.DefaultSelector()
    conns: list[_Conn] = []
    try:
        for i in range(streams):
            host, port = addrs[i % len(addrs)]
            sock = socket.create_connection((host, port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
            conn = _Conn(sock, _request(host, model, max_tokens, i))
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ, conn)
            conns.append(conn)
        t0 = time.monotonic()
        measure_from = t0 + warmup
        end = measure_from + duration
        cpu0 = cpu1 = 0.0
        w0 = w1 = t0
        while (now := time.monotonic()) < end:
            if not cpu0 and now >= measure_from:
                cpu0, w0 = _cpu_seconds(pid), now
            for key, _ in sel.select(timeout=min(0.05, end - now)):
                conn = key.data
                if not conn.on_readable(offset, ancsize):
                    sel.unregister(conn.sock)
                    conn.errors += 1
        cpu1, w1 = _cpu_seconds(pid), time.monotonic()
    finally:
        sel.close()
        for c in conns:
            c.sock.close()
    stamps = [s for c in conns for s in token_stamps(c.reads)]
    cpu_pct = 100 * (cpu1 - cpu0) / (w1 - w0) if w1 > w0 else math.nan
    requests = sum(c.requests for c in conns)
    errors = sum(c.errors for c in conns)
    return summarize(streams, stamps, (measure_from, w1), requests, errors, cpu_pct)


def _start_sim(
    replicas: int, time_scale: float, max_seqs: int, cpu: int | None
) -> tuple[subprocess.Popen[bytes], list[tuple[str, int]]]:
    cmd = [
        sys.executable,
        "-m",
        "inferoute",
        "--log-level",
        "WARNING",
        "sim",
        "--replicas",
        str(replicas),
        "--port",
        "0",
        "--time-scale",
        str(time_scale),
        "--max-num-seqs",
        str(max_seqs),
        "--max-num-batched-tokens",
        str(max(8192, max_seqs)),
        "--max-waiting",
        "100000",
        "--emit-schedule",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    try:
        if cpu is not None:
            os.sched_setaffinity(proc.pid, {cpu})
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        if not ready:
            raise click.ClickException("the simulator did not start listening within 30 s")
        line = proc.stdout.readline().decode()
        if not line:
            raise click.ClickException("the simulator exited before listening")
        addrs = []
        for part in line.split():
            host, _, port = part.split("=", 1)[1].rpartition(":")
            addrs.append((host, int(port)))
        return proc, addrs
    except BaseException:
        _stop(proc)
        raise


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout:
        proc.stdout.close()


def sweep(
    levels: Sequence[int],
    replicas: int,
    duration: float,
    warmup: float,
    max_tokens: int,
    time_scale: float,
    pin: bool,
    nice: int = 0,
    realtime: bool = False,
    bisect: int = 0,
    target_ms: float = 5.0,
) -> list[Level]:
    """Start one simulator process and measure every level against it; then ``bisect`` more levels between
    the largest passing and the smallest failing one. ``nice`` (negative needs privileges) is applied to
    both processes, to approximate dedicated cores on a shared host."""
    from inferoute.sim.config import DEFAULT_MODEL

    cpus = sorted(os.sched_getaffinity(0))
    sim_cpu = cpus[0] if pin and len(cpus) >= 2 else None
    own_nice = os.getpriority(os.PRIO_PROCESS, 0)
    own_policy = os.sched_getscheduler(0)
    if sim_cpu is not None:
        os.sched_setaffinity(0, set(cpus[1:]))
    max_streams = max(levels)
    proc, addrs = _start_sim(replicas, time_scale, max_streams, sim_cpu)
    results: list[Level] = []
    try:
        if nice:
            os.setpriority(os.PRIO_PROCESS, proc.pid, nice)
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        if realtime:
            # SCHED_RR ignores autogroups (which make nice useless across login sessions); the kernel's RT
            # throttling still leaves other processes 5% of each CPU.
            for pid in (proc.pid, 0):
                os.sched_setscheduler(pid, os.SCHED_RR, os.sched_param(10))

        def measure(n: int) -> Level:
            lv = run_level(addrs, proc.pid, DEFAULT_MODEL, n, duration, warmup, max_tokens)
            click.echo(
                f"streams={n:5d}  tokens/s={lv.tokens_per_s:9.0f}  delay p50={lv.delay_p50_ms:6.2f} "
                f"p99={lv.delay_p99_ms:7.2f} max={lv.delay_max_ms:7.1f} ms  "
                f"server p99={lv.server_p99_ms:6.2f} client p99={lv.client_p99_ms:6.2f} ms  "
                f"sim cpu={lv.sim_cpu_pct:4.0f}%  errors={lv.errors}"
            )
            time.sleep(0.5)  # let the simulator drop the aborted streams before the next level
            return lv

        results.extend(measure(n) for n in levels)
        for _ in range(bisect):
            lo = max_sustained(results, target_ms)
            failing = [lv.streams for lv in results if lv.streams > lo]
            if not lo or not failing or min(failing) - lo < 2:
                break
            results.append(measure((lo + min(failing)) // 2))
        results.sort(key=lambda lv: lv.streams)
    except PermissionError as exc:
        raise click.ClickException(f"--nice/--realtime: {exc} (they need CAP_SYS_NICE)") from exc
    finally:
        _stop(proc)
        if sim_cpu is not None:
            os.sched_setaffinity(0, set(cpus))
        if nice:
            with contextlib.suppress(PermissionError):
                os.setpriority(os.PRIO_PROCESS, 0, own_nice)
        if realtime:
            with contextlib.suppress(PermissionError):
                os.sched_setscheduler(0, own_policy, os.sched_param(0))
    return results


@click.command()
@click.option(
    "--streams",
    default="50,100,200,400,800",
    show_default=True,
    callback=int_list(1, "50,100"),
    help="Comma-separated concurrent stream counts.",
)
@click.option(
    "--replicas",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Simulator replicas in the one process (streams are spread over them).",
)
@click.option(
    "--duration",
    default=8.0,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Measured seconds per level.",
)
@click.option(
    "--warmup",
    default=2.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Unmeasured seconds per level.",
)
@click.option(
    "--max-tokens",
    default=200,
    show_default=True,
    type=click.IntRange(min=1),
    help="Tokens per streamed completion.",
)
@click.option(
    "--time-scale",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Simulator speed (0.1 = ten times faster).",
)
@click.option(
    "--target-ms",
    default=5.0,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="p99 delay target.",
)
@click.option(
    "--pin/--no-pin",
    default=True,
    show_default=True,
    help="Pin the simulator to the first allowed CPU and the client to the others.",
)
@click.option(
    "--nice",
    default=0,
    show_default=True,
    type=click.IntRange(-20, 19),
    help="Scheduling niceness of the simulator and client (e.g. -10 on a busy shared host).",
)
@click.option(
    "--realtime",
    is_flag=True,
    help="Run the simulator and client under SCHED_RR (approximates dedicated cores on a busy shared host).",
)
@click.option(
    "--bisect",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Extra levels bisecting between the largest passing and smallest failing stream count.",
)
@click.option(
    "--out",
    default="bench-results/sim-fidelity.json",
    show_default=True,
    type=click.Path(),
    callback=out_file,
    help="JSON file with every figure and the conditions.",
)
def command(
    streams: list[int],
    replicas: int,
    duration: float,
    warmup: float,
    max_tokens: int,
    time_scale: float,
    target_ms: float,
    pin: bool,
    nice: int,
    realtime: bool,
    bisect: int,
    out: Path,
) -> None:
    """Token timing fidelity of `inferoute sim`: delay between each token's scheduled time and its arrival."""
    levels = streams
    if not levels:
        raise click.BadParameter("give at least one stream count", param_hint="'--streams'")
    results = sweep(
        levels, replicas, duration, warmup, max_tokens, time_scale, pin, nice, realtime, bisect, target_ms
    )
    best = max_sustained(results, target_ms)
    click.echo("\n" + markdown(results, target_ms))
    click.echo(f"\nmax streams with p99 delay < {target_ms:g} ms: {best}")
    path = out
    load1, load5, _ = os.getloadavg()
    meta = {
        "argv": sys.argv[1:],
        "replicas": replicas,
        "duration_s": duration,
        "warmup_s": warmup,
        "max_tokens": max_tokens,
        "time_scale": time_scale,
        "target_ms": target_ms,
        "pinned": pin,
        "nice": nice,
        "realtime": realtime,
        "cpus": os.cpu_count(),
        "loadavg_1m_5m_at_end": [load1, load5],
        "max_sustained_streams": best,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path.write_text(json.dumps({"meta": meta, "levels": [asdict(lv) for lv in results]}, indent=2) + "\n")
    click.echo(f"results: {path}")
