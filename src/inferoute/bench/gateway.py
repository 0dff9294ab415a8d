"""``inferoute bench gateway``: what the gateway adds, side by side with its peers, in one run.

Theory of operation
-------------------
One backend -- Debian's NGINX answering every path with a small chat-completion JSON (``return 200``; its
``/metrics`` is a static vLLM-format page so the embedded picker has something to scrape) -- and several
*paths*
to it, all started by this command on free 127.0.0.1 ports and stopped by process group at the end:

* ``direct``: the client talks to the backend itself (the floor);
* ``inferoute``: ``inferoute gateway`` with BBR and the embedded picker (GIE default profile), 1 worker;
* ``inferoute-nopicker``: the same gateway with ``epp.enabled: false`` (BBR + proxy only);
* ``inferoute-2w``: the embedded-picker gateway with ``--workers 2``;
* ``inferoute-baseline`` / ``inferoute-nopicker-baseline`` (only with ``--baseline SRC``): the same two
  gateways run from another version's ``src`` directory, for before/after comparisons in one interleaved run;
* ``nginx``: NGINX ``proxy_pass`` with an upstream keep-alive pool, 1 worker process;
* ``vllm-router``: the Rust router from PyPI, round robin, retries off.

Measurements (small non-streaming ``POST /v1/chat/completions``):

1. **Added latency at a fixed rate** (default 200 req/s, open loop, keep-alive): p50 / p99 of each path
   minus those of ``direct``, with what the scheduler did meanwhile: the machine's busy / stolen CPU share
   and how long each path's processes and the client sat runnable without a CPU (``schedstat`` run delay),
   since on a shared machine that wait, not the proxy, decides the p99.
2. **Highest rate with p99 under 10 ms**: ``wrk`` (C, not the bottleneck) at increasing connection counts;
   the best requests/s among runs whose p99 stayed under the bound.
   With both ``inferoute`` and ``inferoute-2w``: the ``--workers 2`` ratio from alternating ``wrk`` rounds,
   with the cores each side actually got (a second worker only helps if a second core is free).
3. **SSE relay rate**: N concurrent streams of M events each from a separate Python SSE backend (one write per
   event), events per second received by the client through each path.
4. **BBR extraction speed** on a 10 MB chat body: the gateway's one body parse
   (:class:`inferoute.epp.requestcontrol.parse.BodyParser`, simdjson at this size), its msgspec path
   (:func:`~inferoute.epp.requestcontrol.parse.parse_body`) and ``json.loads``.

Everything runs on one (shared) machine: client, paths and backend compete for the same cores, so absolute
numbers move with the load; the relative picture inside one run is what the report is for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import click
import yaml

from inferoute.bench.peers import Contender, ManagedProcess, inferoute_argv, start_on_ports
from inferoute.bench.stats import percentile
from inferoute.cliparams import choice_list, out_dir

log = logging.getLogger(__name__)

CHAT_BODY = json.dumps(
    {
        "model": "bench-model",
        "messages": [{"role": "user", "content": "Say hello in five words."}],
        "max_tokens": 8,
    }
).encode()
BACKEND_ANSWER = (
    '{"id":"chatcmpl-bench","object":"chat.completion","created":0,"model":"bench-model",'
    '"choices":[{"index":0,"message":{"role":"assistant","content":"Hello there, how are you?"},'
    '"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":6,"total_tokens":15}}'
)
BACKEND_METRICS = (
    "# TYPE vllm:num_requests_running gauge\\n"
    'vllm:num_requests_running{model_name=\\"bench-model\\"} 0\\n'
    "# TYPE vllm:num_requests_waiting gauge\\n"
    'vllm:num_requests_waiting{model_name=\\"bench-model\\"} 0\\n'
    "# TYPE vllm:kv_cache_usage_perc gauge\\n"
    'vllm:kv_cache_usage_perc{model_name=\\"bench-model\\"} 0.1\\n'
)
P99_BOUND_MS = 10.0
DEFAULT_PATHS = ("direct", "inferoute", "inferoute-nopicker", "inferoute-2w", "nginx", "vllm-router")


# ---------------------------------------------------------------------------------------------- pure helpers


@dataclass(frozen=True, slots=True)
class WrkResult:
    connections: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    """Socket errors plus non-2xx answers."""


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(output: str, connections: int) -> WrkResult:
    """Read requests/s, the 50% / 99% latency and the error counts out of ``wrk --latency`` output."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    if not (rps and p50 and p99):
        raise ValueError(f"unexpected wrk output:\n{output}")
    errors = 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if sock:
        errors += sum(int(g) for g in sock.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non2xx:
        errors += int(non2xx.group(1))
    return WrkResult(connections, float(rps.group(1)), _ms(p50.group(1)), _ms(p99.group(1)), errors)


def best_rate_under(results: Sequence[WrkResult], p99_bound_ms: float = P99_BOUND_MS) -> WrkResult | None:
    """The highest-throughput error-free run whose p99 stayed under the bound (None if none did)."""
    ok = [r for r in results if r.p99_ms < p99_bound_ms and r.errors == 0]
    return max(ok, key=lambda r: r.requests_per_s, default=None)


def scaling_summary(one: Sequence[float], two: Sequence[float]) -> dict[str, float]:
    """``--workers 2`` against one worker from alternating rounds (requests/s of each round): the medians,
    their ratio and the lowest / highest ratio of one round's pair. Rounds where either side failed (NaN or
    0) are left out; NaN when none is left."""
    pairs = [(a, b) for a, b in zip(one, two, strict=True) if a > 0 and b > 0]  # NaN compares False
    ratios = [b / a for a, b in pairs]
    one_median, two_median = percentile([a for a, _ in pairs], 50), percentile([b for _, b in pairs], 50)
    return {
        "one_worker_rps": one_median,
        "two_workers_rps": two_median,
        "ratio": two_median / one_median if pairs else math.nan,
        "ratio_min": min(ratios, default=math.nan),
        "ratio_max": max(ratios, default=math.nan),
    }


@dataclass(slots=True)
class PathReport:
    name: str
    fixed_rate_p50_ms: float = math.nan
    fixed_rate_p99_ms: float = math.nan
    fixed_rate_errors: int = 0
    fixed_rate_wait_us: float = math.nan
    """Mean time per request that the path's processes (for ``direct``: the backend) spent runnable but
    waiting for a CPU during the fixed-rate test (Linux ``schedstat`` run delay)."""
    fixed_rate_client_wait_us: float = math.nan
    """The same for the load generator (this process) while it measured this path."""
    wrk: list[WrkResult] = field(default_factory=list)
    wrk_cpu_us_per_request: list[float] = field(default_factory=list)
    """CPU (user + system) of the path's processes per request in each wrk run (NaN: not measured)."""
    sse_events_per_s: float = math.nan
    sse_errors: int = 0
    note: str = ""


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and all its descendants (Linux ``/proc``); NaN when unreadable."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    stack = [pid]
    try:
        while stack:
            p = stack.pop()
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                stack.extend(int(c) for c in (task / "children").read_text().split())
    except (OSError, ValueError, IndexError):
        return math.nan
    return total


def tree_run_delay_seconds(pid: int, *, descendants: bool = True) -> float:
    """Seconds the threads of ``pid`` (and of its descendants) spent runnable but waiting for a CPU: the
    scheduler's run delay, the second field of Linux ``/proc/PID/task/TID/schedstat``; NaN when unreadable."""
    total_ns = 0
    stack = [pid]
    try:
        while stack:
            for task in Path(f"/proc/{stack.pop()}/task").iterdir():
                total_ns += int((task / "schedstat").read_text().split()[1])
                if descendants:
                    stack.extend(int(c) for c in (task / "children").read_text().split())
    except (OSError, ValueError, IndexError):
        return math.nan
    return total_ns / 1e9


def cpu_times() -> tuple[int, ...]:
    """The machine's CPU time counters (``/proc/stat`` first line: user nice system idle iowait irq softirq
    steal), in clock ticks; empty when unreadable."""
    try:
        return tuple(int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
    except (OSError, ValueError):
        return ()


def busy_and_steal(before: Sequence[int], after: Sequence[int]) -> tuple[float, float]:
    """Fractions of CPU time between two :func:`cpu_times` readings that were busy (not idle or iowait) and
    stolen by the hypervisor; NaN when unknown."""
    if len(before) < 8 or len(after) < 8:
        return math.nan, math.nan
    delta = [b - a for a, b in zip(before, after, strict=True)]
    total = sum(delta)
    if total <= 0:
        return math.nan, math.nan
    return (total - delta[3] - delta[4]) / total, delta[7] / total


# ---------------------------------------------------------------------------------------------- processes


def _nginx_binary() -> str:
    for c in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if c and Path(c).exists():
            return c
    raise click.ClickException("nginx is not installed (make test-deps installs it)")


def _nginx_conf(prefix: Path, server_block: str) -> Path:
    for d in ("logs", "temp/client_body", "temp/proxy", "temp/fastcgi", "temp/uwsgi", "temp/scgi"):
        (prefix / d).mkdir(parents=True, exist_ok=True)
    temp = "".join(
        f"  {d}_temp_path temp/{d};\n" for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = prefix / "nginx.conf"
    conf.write_text(
        "worker_processes 1;\npid nginx.pid;\nerror_log logs/error.log warn;\n"
        "events { worker_connections 4096; }\n"
        f"http {{\n  access_log off;\n{temp}{server_block}\n}}\n"
    )
    return conf


def _nginx(name: str, prefix: Path, server_block: str) -> ManagedProcess:
    prefix = prefix.resolve()  # NGINX reads a relative -c under its -p prefix (a relative --out doubled it)
    conf = _nginx_conf(prefix, server_block)
    argv = [_nginx_binary(), "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"]
    return ManagedProcess(name, argv, prefix / "stdout.log")


def backend_nginx(workdir: Path, port: int) -> ManagedProcess:
    block = f"""
  server {{
    listen 127.0.0.1:{port} reuseport backlog=4096;
    keepalive_requests 1000000;
    location = /metrics {{ default_type text/plain; return 200 "{BACKEND_METRICS}"; }}
    location / {{ default_type application/json; return 200 '{BACKEND_ANSWER}'; }}
  }}"""
    return _nginx("backend", workdir / "nginx-backend", block)


def proxy_nginx(workdir: Path, port: int, upstream: str) -> ManagedProcess:
    block = f"""
  upstream backend {{ server {upstream}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    keepalive_requests 1000000;
    client_max_body_size 64m;
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}"""
    return _nginx("nginx-proxy", workdir / "nginx-proxy", block)


def gateway_process(
    workdir: Path,
    name: str,
    port: int,
    upstream: str,
    *,
    picker: bool,
    workers: int = 1,
    source: Path | None = None,
) -> ManagedProcess:
    """``inferoute gateway`` on ``port`` in front of ``upstream``; ``source``: run the ``inferoute`` package
    found in that ``src`` directory instead of this installation's (a baseline, see ``--baseline``)."""
    host, _, up_port = upstream.rpartition(":")
    cfg = {
        "listen": f"127.0.0.1:{port}",
        "workers": workers,
        "pool": {"endpoints": [{"name": "backend", "address": host, "port": int(up_port)}]},
        "routes": [{"path": "/", "epp": {"enabled": picker, "endpoint": "embedded"}}],
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    argv = inferoute_argv("--log-level", "WARNING", "gateway", "--config", str(path))
    env = {"PYTHONPATH": str(source)} if source is not None else None
    return ManagedProcess(name, argv, workdir / f"{name}.log", env=env)


def vllm_router_process(workdir: Path, port: int, upstream: str, metrics_port: int) -> ManagedProcess:
    router = Contender("vllm-router", "vllm-router", "round_robin")
    argv = router.argv(port, [f"http://{upstream}"], workdir, metrics_port=metrics_port)
    return ManagedProcess("vllm-router", argv, workdir / "vllm-router.log")


def sse_backend_process(workdir: Path, port: int, events: int) -> ManagedProcess:
    argv = [sys.executable, "-m", "inferoute.bench.gateway", "--sse-backend", str(port), str(events)]
    return ManagedProcess("sse-backend", argv, workdir / "sse-backend.log")


async def _serve_sse(port: int, events: int) -> None:
    """A model-server stand-in that streams ``events`` SSE chunks, one write each, as fast as it can."""
    from aiohttp import web

    chunk = b'data: {"choices":[{"index":0,"delta":{"content":"tok"}}]}\n\n'

    async def stream(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(events):
            await resp.write(chunk)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=BACKEND_METRICS.replace("\\n", "\n").replace('\\"', '"'))

    app = web.Application()
    app.router.add_get("/health", ok)
    app.router.add_get("/metrics", metrics)
    app.router.add_route("*", "/{tail:.*}", stream)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


# ---------------------------------------------------------------------------------------------- load


class OpenLoopClient:
    """Small ``POST``s to one URL at a fixed rate, open loop, on one keep-alive session that lives across
    calls of :meth:`run` (so that short interleaved slices do not reopen connections)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._session: aiohttp.ClientSession | None = None
        self._headers = {"Content-Type": "application/json"}

    async def __aenter__(self) -> OpenLoopClient:
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _one(self, latencies: list[float]) -> bool:
        assert self._session is not None, "use OpenLoopClient as an async context manager"
        t0 = time.perf_counter()
        try:
            async with self._session.post(self.url, data=CHAT_BODY, headers=self._headers) as r:
                await r.read()
                if r.status != 200:
                    return False
        except aiohttp.ClientError:
            return False
        latencies.append((time.perf_counter() - t0) * 1000)
        return True

    async def warm(self, requests: int) -> None:
        """Requests one after the other, not measured: the connection and the path get warm."""
        for _ in range(requests):
            await self._one([])

    async def run(self, rate: float, duration: float) -> tuple[list[float], int]:
        """One request every ``1/rate`` s for ``duration`` s; latencies (ms) and the error count."""
        latencies: list[float] = []
        outcomes: list[bool] = []

        async def one() -> None:
            outcomes.append(await self._one(latencies))

        n = max(1, round(rate * duration))
        start = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            for i in range(n):
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tg.create_task(one())
        return latencies, outcomes.count(False)


def slice_order(paths: Sequence[str], round_index: int) -> list[str]:
    """The paths of one round of the fixed-rate test, rotated by one each round, so that no path always
    follows the same neighbour."""
    k = round_index % len(paths) if paths else 0
    return [*paths[k:], *paths[:k]]


def run_wrk(url: str, connections: int, duration: float, workdir: Path) -> WrkResult:
    script = workdir / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(CHAT_BODY.decode())}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    wrk = shutil.which("wrk")
    if wrk is None:
        raise click.ClickException("wrk is not installed (apt-get install wrk)")
    threads = min(2, connections)
    out = subprocess.run(
        [
            wrk,
            "-t",
            str(threads),
            "-c",
            str(connections),
            "-d",
            f"{duration:g}s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        timeout=duration + 60,
        check=True,
    ).stdout
    return parse_wrk(out, connections)


async def sse_rate(url: str, streams: int, rounds: int) -> tuple[float, int]:
    """Events/s received over ``streams`` concurrent SSE requests, repeated ``rounds`` times."""
    events = 0
    errors = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=streams)) as session:

        async def one() -> None:
            nonlocal events, errors
            try:
                async with session.post(
                    url, data=CHAT_BODY, headers={"Content-Type": "application/json"}
                ) as r:
                    if r.status != 200:
                        errors += 1
                        return
                    async for line in r.content:
                        if line.startswith(b"data: {"):
                            events += 1
            except aiohttp.ClientError:
                errors += 1

        await one()
        events = 0
        t0 = time.perf_counter()
        for _ in range(rounds):
            async with asyncio.TaskGroup() as tg:
                for _ in range(streams):
                    tg.create_task(one())
        elapsed = time.perf_counter() - t0
    return events / elapsed, errors


def bbr_speed(size_mb: float = 10.0, repeat: int = 5) -> dict[str, float]:
    """GB/s of :class:`BodyParser` (the gateway's one parse of a body), :func:`parse_body` (its msgspec path)
    and of ``json.loads`` on a chat body of ``size_mb`` MB (best of ``repeat``)."""
    from inferoute.epp.requestcontrol.parse import BodyParser, parse_body

    parser = BodyParser()

    turn = {"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 20}
    n = int(size_mb * 1_000_000 / len(json.dumps(turn)))
    body = json.dumps({"messages": [turn] * n, "model": "bench-model", "stream": True}).encode()
    assert parse_body(body).model == parser.parse(body).model == "bench-model"

    def best(fn: Callable[[bytes], object]) -> float:
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn(body)
            times.append(time.perf_counter() - t0)
        return len(body) / min(times) / 1e9

    return {
        "body_mb": len(body) / 1e6,
        "body_parser_gb_s": best(parser.parse),
        "msgspec_gb_s": best(parse_body),
        "json_loads_gb_s": best(json.loads),
    }


def parse_paths_by_size(
    sizes: tuple[int, ...] = (4096, 16384, 65536, 262144, 1048576), repeat: int = 7
) -> list[tuple[int, float, float]]:
    """``(bytes, msgspec µs, simdjson µs)`` per chat body size: the two paths of the one body parse
    (:func:`parse_body` and :class:`BodyParser`'s simdjson path), best of ``repeat`` interleaved rounds. Where
    they cross is where :data:`~inferoute.epp.requestcontrol.parse.SIMD_MIN_BODY` belongs."""
    from inferoute.epp.requestcontrol import parse

    parser = parse.BodyParser()
    simd = parser._large  # the simdjson path alone, whatever SIMD_MIN_BODY says
    turn = {"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 3}
    out = []
    for size in sizes:
        body = json.dumps({"model": "m", "messages": [turn] * (size // 160), "stream": True}).encode()
        assert simd(body) == parse.parse_body(body)
        rounds = max(20, 3_000_000 // len(body))
        best = {"msgspec": math.inf, "simd": math.inf}
        for _ in range(repeat):
            for name, fn in (("msgspec", parse.parse_body), ("simd", simd)):
                t0 = time.perf_counter()
                for _ in range(rounds):
                    fn(body)
                best[name] = min(best[name], (time.perf_counter() - t0) / rounds * 1e6)
        out.append((len(body), best["msgspec"], best["simd"]))
    return out


# ---------------------------------------------------------------------------------------------- orchestration


@dataclass(slots=True)
class BenchOptions:
    out: Path
    rate: float = 200.0
    fixed_duration: float = 10.0
    slice_seconds: float = 0.25
    """Length of one interleaved slice of the fixed-rate test."""
    wrk_duration: float = 4.0
    connections: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    sse_streams: int = 8
    sse_events: int = 500
    sse_rounds: int = 3
    paths: tuple[str, ...] = DEFAULT_PATHS
    baseline: Path | None = None
    """A ``src`` directory of another inferoute version: enables the ``*-baseline`` paths."""
    scaling_rounds: int = 3
    """Alternating wrk rounds of ``inferoute`` and ``inferoute-2w`` for the ``--workers 2`` ratio."""
    scaling_connections: int = 32


async def _start(
    procs: list[ManagedProcess],
    make: Callable[[list[int]], ManagedProcess],
    ready_path: str,
    ports: int = 1,
) -> int:
    """Start a process on a port it is seen to hold (:func:`~inferoute.bench.peers.start_on_ports`), add it
    to ``procs`` (to stop them all) and return the port."""
    proc, chosen = await start_on_ports(
        make, lambda p: [f"http://127.0.0.1:{p[0]}{ready_path}"], ports=ports, owned=1
    )
    procs.append(proc)
    return chosen[0]


CHAT = "/v1/chat/completions"


@dataclass(slots=True)
class _Paths:
    """Where each path under test answers: its JSON and SSE front URLs, and the pid of its JSON front."""

    json_url: dict[str, str] = field(default_factory=dict)
    json_pid: dict[str, int] = field(default_factory=dict)
    sse_url: dict[str, str] = field(default_factory=dict)


async def run_bench(opts: BenchOptions, echo: Callable[[str], None] = click.echo) -> dict[str, Any]:
    load_before = _loadavg()
    busy = steal = math.nan
    scaling: dict[str, float] | None = None
    work = opts.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    procs: list[ManagedProcess] = []
    reports = {name: PathReport(name) for name in opts.paths}
    try:
        paths = await _start_paths(opts, work, procs)
        busy, steal = await _fixed_rate(opts, paths, reports, echo)
        await _wrk_sweep(opts, paths, reports, work, echo)
        if {"inferoute", "inferoute-2w"} <= set(opts.paths) and opts.scaling_rounds > 0:
            scaling = await _scaling(opts, paths.json_url, paths.json_pid, work, echo)
        echo(f"SSE relay: {opts.sse_streams} streams x {opts.sse_events} events x {opts.sse_rounds} rounds")
        for name in opts.paths:
            rate, errs = await sse_rate(paths.sse_url[name] + CHAT, opts.sse_streams, opts.sse_rounds)
            reports[name].sse_events_per_s, reports[name].sse_errors = rate, errs
            echo(f"  {name:20s} {rate:10.0f} events/s  errors {errs}")
    finally:
        for p in reversed(procs):
            await p.stop()
    bbr = bbr_speed()
    echo(
        f"BBR on {bbr['body_mb']:.1f} MB: BodyParser {bbr['body_parser_gb_s']:.2f} GB/s, "
        f"parse_body {bbr['msgspec_gb_s']:.2f} GB/s, json.loads {bbr['json_loads_gb_s']:.2f} GB/s"
    )
    result = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": {
            "cpus": _cpus(),
            "python": platform.python_version(),
            "load_before": load_before,
            "fixed_rate_cpu_busy": busy,
            "fixed_rate_cpu_steal": steal,
        },
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
        "paths": {n: asdict(r) for n, r in reports.items()},
        "scaling": scaling,
        "bbr": bbr,
    }
    (opts.out / "gateway.json").write_text(json.dumps(result, indent=2))
    (opts.out / "gateway.md").write_text(render_markdown(result))
    return result


async def _start_paths(opts: BenchOptions, work: Path, procs: list[ManagedProcess]) -> _Paths:
    """The two backends (JSON nginx, SSE streamer), then each path's JSON and SSE fronts, every one
    started and answering its readiness URL; ``procs`` gets each process as it starts (to stop them all)."""
    backend = f"127.0.0.1:{await _start(procs, lambda p: backend_nginx(work, p[0]), '/health')}"
    sse_port = await _start(procs, lambda p: sse_backend_process(work, p[0], opts.sse_events), "/health")
    paths = _Paths(
        json_url={"direct": f"http://{backend}"},
        json_pid={"direct": procs[0].proc.pid if procs[0].proc else -1},
        sse_url={"direct": f"http://127.0.0.1:{sse_port}"},
    )
    starters = _front_starters(opts, work)
    for name in opts.paths:
        if name == "direct":
            continue
        for kind, up in (("json", backend), ("sse", f"127.0.0.1:{sse_port}")):

            def make(ports: list[int], name: str = name, kind: str = kind, up: str = up) -> ManagedProcess:
                proc = starters[name](ports, up)
                proc.name = f"{name}-{kind}"
                return proc

            port = await _start(procs, make, READY_PATH[name], ports=2)
            proc = procs[-1]
            (paths.sse_url if kind == "sse" else paths.json_url)[name] = f"http://127.0.0.1:{port}"
            if kind == "json" and proc.proc is not None:
                paths.json_pid[name] = proc.proc.pid
        if name == "inferoute-2w":
            await asyncio.sleep(1.0)  # both workers listening
    return paths


READY_PATH = {
    "inferoute": "/readyz",
    "inferoute-nopicker": "/healthz",
    "inferoute-2w": "/readyz",
    "inferoute-baseline": "/readyz",
    "inferoute-nopicker-baseline": "/healthz",
    "nginx": "/health",
    "vllm-router": "/health",
}
"""Each front's readiness path."""


def _front_starters(opts: BenchOptions, work: Path) -> dict[str, Callable[[list[int], str], ManagedProcess]]:
    """Path name -> (ports, upstream) -> its front process on ``ports[0]`` (``ports[1]``: vllm-router's
    Prometheus port)."""
    return {
        "inferoute": lambda p, up: gateway_process(work, f"inferoute-{p[0]}", p[0], up, picker=True),
        "inferoute-nopicker": lambda p, up: gateway_process(work, f"nopicker-{p[0]}", p[0], up, picker=False),
        "inferoute-2w": lambda p, up: gateway_process(
            work, f"inferoute2w-{p[0]}", p[0], up, picker=True, workers=2
        ),
        "inferoute-baseline": lambda p, up: gateway_process(
            work, f"base-{p[0]}", p[0], up, picker=True, source=opts.baseline
        ),
        "inferoute-nopicker-baseline": lambda p, up: gateway_process(
            work, f"basenop-{p[0]}", p[0], up, picker=False, source=opts.baseline
        ),
        "nginx": lambda p, up: proxy_nginx(work / f"nginx-{p[0]}", p[0], up),
        "vllm-router": lambda p, up: vllm_router_process(work, p[0], up, p[1]),
    }


async def _fixed_rate(
    opts: BenchOptions, paths: _Paths, reports: dict[str, PathReport], echo: Callable[[str], None]
) -> tuple[float, float]:
    """Every path at ``opts.rate`` in short interleaved slices; latency percentiles, errors and the CPU wait
    per request into ``reports``. Returns the machine's CPU busy and stolen fractions meanwhile."""
    slices = max(1, round(opts.fixed_duration / opts.slice_seconds))
    echo(
        f"fixed rate {opts.rate:g} req/s, {opts.fixed_duration:g}s per path "
        f"({slices} interleaved slices of {opts.slice_seconds:g} s)"
    )
    lats: dict[str, list[float]] = {n: [] for n in opts.paths}
    errors: dict[str, int] = dict.fromkeys(opts.paths, 0)
    waits: dict[str, list[float]] = {n: [0.0, 0.0] for n in opts.paths}
    async with contextlib.AsyncExitStack() as stack:
        clients = {
            n: await stack.enter_async_context(OpenLoopClient(paths.json_url[n] + CHAT)) for n in opts.paths
        }
        for client in clients.values():
            await client.warm(20)
        cpu_before = cpu_times()
        for i in range(slices):
            # short interleaved slices spread the machine's load swings over every path alike
            for name in slice_order(opts.paths, i):
                pid = paths.json_pid[name]
                path_wait = tree_run_delay_seconds(pid)
                client_wait = tree_run_delay_seconds(os.getpid(), descendants=False)
                lat, errs = await clients[name].run(opts.rate, opts.slice_seconds)
                waits[name][0] += tree_run_delay_seconds(pid) - path_wait
                waits[name][1] += tree_run_delay_seconds(os.getpid(), descendants=False) - client_wait
                lats[name].extend(lat)
                errors[name] += errs
        busy, steal = busy_and_steal(cpu_before, cpu_times())
    echo(f"  machine during the fixed-rate test: CPU busy {busy:.0%}, stolen {steal:.1%}")
    for name in opts.paths:
        r = reports[name]
        lat, errs = lats[name], errors[name]
        r.fixed_rate_p50_ms, r.fixed_rate_p99_ms, r.fixed_rate_errors = (
            percentile(lat, 50),
            percentile(lat, 99),
            errs,
        )
        n = max(1, len(lat) + errs)
        r.fixed_rate_wait_us, r.fixed_rate_client_wait_us = (w / n * 1e6 for w in waits[name])
        echo(
            f"  {name:20s} p50 {r.fixed_rate_p50_ms:7.3f} ms  p99 {r.fixed_rate_p99_ms:7.3f} ms"
            f"  errors {errs}  waited for a CPU per request: path {r.fixed_rate_wait_us:5.0f} us,"
            f" client {r.fixed_rate_client_wait_us:5.0f} us"
        )
    return busy, steal


async def _wrk_sweep(
    opts: BenchOptions,
    paths: _Paths,
    reports: dict[str, PathReport],
    work: Path,
    echo: Callable[[str], None],
) -> None:
    """``wrk`` at each connection count against each path: throughput, latency and CPU per request."""
    echo(f"wrk sweep, connections {list(opts.connections)}, {opts.wrk_duration:g}s each")
    for name in opts.paths:
        pid = paths.json_pid[name]
        for c in opts.connections:
            cpu0 = tree_cpu_seconds(pid)
            res = await asyncio.to_thread(run_wrk, paths.json_url[name] + CHAT, c, opts.wrk_duration, work)
            cpu_us = (tree_cpu_seconds(pid) - cpu0) / max(1.0, res.requests_per_s * opts.wrk_duration)
            reports[name].wrk.append(res)
            reports[name].wrk_cpu_us_per_request.append(cpu_us * 1e6)
            echo(
                f"  {name:20s} c={c:<3d} {res.requests_per_s:9.0f} req/s  p50 {res.p50_ms:7.3f} ms"
                f"  p99 {res.p99_ms:7.3f} ms  errors {res.errors}  cpu {cpu_us * 1e6:6.0f} us/req"
            )


async def _scaling(
    opts: BenchOptions,
    json_url: dict[str, str],
    json_pid: dict[str, int],
    work: Path,
    echo: Callable[[str], None],
) -> dict[str, float]:
    """``inferoute`` and ``inferoute-2w`` measured in alternating ``wrk`` rounds at one connection count (two
    wrk threads), so that the machine's load swings hit both alike; also how many cores each got (CPU seconds
    of its processes per second of the round)."""
    c, chat = opts.scaling_connections, CHAT
    rounds, secs = opts.scaling_rounds, opts.wrk_duration
    echo(f"--workers 2 vs 1 worker: wrk -c{c}, {rounds} alternating rounds, {secs:g}s each")
    rps: dict[str, list[float]] = {"inferoute": [], "inferoute-2w": []}
    cores: dict[str, list[float]] = {"inferoute": [], "inferoute-2w": []}
    for i in range(opts.scaling_rounds):
        order = ("inferoute", "inferoute-2w") if i % 2 == 0 else ("inferoute-2w", "inferoute")
        for name in order:
            cpu0, t0 = tree_cpu_seconds(json_pid[name]), time.perf_counter()
            res = await asyncio.to_thread(run_wrk, json_url[name] + chat, c, opts.wrk_duration, work)
            cores[name].append((tree_cpu_seconds(json_pid[name]) - cpu0) / (time.perf_counter() - t0))
            rps[name].append(res.requests_per_s if res.errors == 0 else math.nan)
        one, two = rps["inferoute"][-1], rps["inferoute-2w"][-1]
        echo(
            f"  round {i + 1}: 1 worker {one:7.0f} req/s on {cores['inferoute'][-1]:.2f} cores,"
            f" 2 workers {two:7.0f} req/s on {cores['inferoute-2w'][-1]:.2f} cores"
        )
    summary = scaling_summary(rps["inferoute"], rps["inferoute-2w"])
    summary |= {
        "connections": c,
        "rounds": opts.scaling_rounds,
        "seconds": opts.wrk_duration,
        "one_worker_cores": _median_finite(cores["inferoute"]),
        "two_workers_cores": _median_finite(cores["inferoute-2w"]),
        "one_worker_rps_per_core": _median_finite(_per(rps["inferoute"], cores["inferoute"])),
        "two_workers_rps_per_core": _median_finite(_per(rps["inferoute-2w"], cores["inferoute-2w"])),
    }
    echo(
        f"  median {summary['one_worker_rps']:.0f} vs {summary['two_workers_rps']:.0f} req/s: "
        f"{summary['ratio']:.2f}x (rounds {summary['ratio_min']:.2f}-{summary['ratio_max']:.2f}x); per core "
        f"{summary['one_worker_rps_per_core']:.0f} vs {summary['two_workers_rps_per_core']:.0f} req/s"
    )
    return summary


def _median_finite(values: Sequence[float]) -> float:
    return percentile([v for v in values if not math.isnan(v)], 50)


def _per(rates: Sequence[float], cores: Sequence[float]) -> list[float]:
    return [r / c if c > 0 else math.nan for r, c in zip(rates, cores, strict=True)]


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def render_markdown(result: dict[str, Any]) -> str:
    """The report tables (pure: from the JSON result)."""
    paths: dict[str, dict[str, Any]] = result["paths"]
    direct = paths.get("direct", {})
    d50, d99 = direct.get("fixed_rate_p50_ms", math.nan), direct.get("fixed_rate_p99_ms", math.nan)
    rate = result["options"]["rate"]
    lines = [
        f"Run {result['when']}, {result['machine']['cpus']} CPUs (shared), "
        f"load before {result['machine']['load_before']}.",
        "",
        f"| path | p50 at {rate:g}/s | p99 at {rate:g}/s | added p50 | added p99 "
        "| best req/s with p99 < 10 ms "
        "(connections) | max req/s (wrk) | CPU per request | SSE events/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in paths.items():
        wrk = [WrkResult(**w) for w in r["wrk"]]
        best = best_rate_under(wrk)
        top = max((w.requests_per_s for w in wrk), default=math.nan)
        added50 = "-" if name == "direct" else f"{r['fixed_rate_p50_ms'] - d50:+.3f} ms"
        added99 = "-" if name == "direct" else f"{r['fixed_rate_p99_ms'] - d99:+.3f} ms"
        best_txt = f"{best.requests_per_s:,.0f} ({best.connections})" if best else "none"
        cpu_values = [v for v in r.get("wrk_cpu_us_per_request", []) if not math.isnan(v)]
        cpu_txt = f"{percentile(cpu_values, 50):,.0f} µs" if cpu_values else "-"
        lines.append(
            f"| {name} | {r['fixed_rate_p50_ms']:.3f} ms | {r['fixed_rate_p99_ms']:.3f} ms "
            f"| {added50} | {added99} "
            f"| {best_txt} | {top:,.0f} | {cpu_txt} | {r['sse_events_per_s']:,.0f} |"
        )
    lines += _scheduler_lines(result)
    scaling = result.get("scaling")
    if scaling:
        lines += [
            "",
            f"`--workers 2` against 1 worker (`wrk -c{scaling['connections']}`, {scaling['rounds']} "
            f"alternating rounds of {scaling['seconds']:g} s, medians): {scaling['two_workers_rps']:,.0f} vs "
            f"{scaling['one_worker_rps']:,.0f} req/s, **{scaling['ratio']:.2f}x** (per round "
            f"{scaling['ratio_min']:.2f}-{scaling['ratio_max']:.2f}x); the gateway's processes got "
            f"{scaling.get('two_workers_cores', math.nan):.2f} vs "
            f"{scaling.get('one_worker_cores', math.nan):.2f} cores (median CPU seconds per second), "
            f"{scaling.get('two_workers_rps_per_core', math.nan):,.0f} vs "
            f"{scaling.get('one_worker_rps_per_core', math.nan):,.0f} req/s per core.",
        ]
    bbr = result["bbr"]
    if "body_parser_gb_s" in bbr:
        fastest, msgspec = bbr["body_parser_gb_s"], bbr["msgspec_gb_s"]
        what = f"`BodyParser` (simdjson) {fastest:.2f} GB/s, `parse_body` (msgspec) {msgspec:.2f} GB/s"
    else:  # results of older versions: the model-only readers
        reader, msgspec = bbr.get("model_reader_gb_s"), bbr["extract_model_gb_s"]
        reader_txt = f"`ModelReader` (simdjson) {reader:.2f} GB/s, " if reader is not None else ""
        fastest = reader if reader is not None else msgspec
        what = f"{reader_txt}`extract_model` (msgspec) {msgspec:.2f} GB/s"
    lines += [
        "",
        f"BBR model extraction on a {bbr['body_mb']:.1f} MB chat body: {what}, "
        f"`json.loads` {bbr['json_loads_gb_s']:.2f} GB/s ({fastest / bbr['json_loads_gb_s']:.1f}x).",
        "",
    ]
    return "\n".join(lines)


def _scheduler_lines(result: dict[str, Any]) -> list[str]:
    """What the scheduler did during the fixed-rate test (absent from results of older versions)."""
    machine = result["machine"]
    waits = [
        f"`{name}` {r['fixed_rate_wait_us']:,.0f} / {r['fixed_rate_client_wait_us']:,.0f} µs"
        for name, r in result["paths"].items()
        if not math.isnan(r.get("fixed_rate_wait_us", math.nan))
    ]
    if not waits:
        return []
    busy, steal = machine.get("fixed_rate_cpu_busy", math.nan), machine.get("fixed_rate_cpu_steal", math.nan)
    return [
        "",
        f"During the fixed-rate test the machine's CPUs were {busy:.0%} busy ({steal:.1%} stolen by the "
        "hypervisor). Time spent runnable but waiting for a CPU, per request, by the path's processes (for "
        "`direct`: the backend) / by the load generator: " + ", ".join(waits) + ".",
    ]


@click.command("gateway")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    callback=out_dir,
    default=Path("bench-results/gateway"),
    show_default=True,
    help="Directory for the JSON results and the Markdown report.",
)
@click.option(
    "--rate",
    default=200.0,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Fixed request rate for the added-latency test.",
)
@click.option(
    "--duration",
    "fixed_duration",
    type=click.FloatRange(0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds at the fixed rate.",
)
@click.option(
    "--slice",
    "slice_seconds",
    default=0.25,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Length of one interleaved slice of the fixed-rate test (seconds).",
)
@click.option(
    "--wrk-duration",
    default=4.0,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Seconds per wrk run (wrk counts whole seconds: at least 1).",
)
@click.option(
    "--scaling-rounds",
    default=3,
    show_default=True,
    type=click.IntRange(min=0),
    help="Alternating wrk rounds of inferoute and inferoute-2w for the --workers 2 ratio (0: skip).",
)
@click.option(
    "--paths",
    default=",".join(DEFAULT_PATHS),
    show_default=True,
    callback=lambda c, p, v: choice_list("direct", *READY_PATH)(c, p, v),
    help="Comma-separated paths to measure (direct is always included).",
)
@click.option("--bbr-only", is_flag=True, help="Only the BBR extraction speed (no processes).")
@click.option(
    "--baseline",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=None,
    help="A src/ directory of another inferoute version (e.g. from `git archive COMMIT src`): adds the paths "
    "inferoute-baseline and inferoute-nopicker-baseline, measured interleaved with the others.",
)
def command(
    out: Path,
    rate: float,
    fixed_duration: float,
    slice_seconds: float,
    wrk_duration: float,
    scaling_rounds: int,
    paths: str,
    bbr_only: bool,
    baseline: Path | None,
) -> None:
    """Gateway overhead vs a direct connection, NGINX proxy_pass and vllm-router; SSE relay; BBR speed."""
    from inferoute.gateway.serve import run_async

    if bbr_only:
        bbr = bbr_speed()
        click.echo(json.dumps(bbr, indent=2))
        click.echo(
            "body bytes   msgspec µs   simdjson µs   (the one parse's two paths; SIMD_MIN_BODY between)"
        )
        for size, msgspec_us, simd_us in parse_paths_by_size():
            click.echo(f"{size:10d} {msgspec_us:12.2f} {simd_us:13.2f}")
        return
    chosen = tuple(dict.fromkeys(["direct", *[p.strip() for p in paths.split(",") if p.strip()]]))
    if any(p.endswith("-baseline") for p in chosen) and baseline is None:
        raise click.UsageError("the *-baseline paths need --baseline SRC_DIR")
    opts = BenchOptions(
        out=out,
        rate=rate,
        fixed_duration=fixed_duration,
        slice_seconds=slice_seconds,
        wrk_duration=wrk_duration,
        scaling_rounds=scaling_rounds,
        paths=chosen,
        baseline=baseline.resolve() if baseline is not None else None,
    )

    async def main() -> int:
        await run_bench(opts)
        click.echo(f"results: {out / 'gateway.json'}, {out / 'gateway.md'}")
        return 0

    raise SystemExit(run_async(main))


def _main(argv: list[str]) -> None:
    """``python -m inferoute.bench.gateway --sse-backend PORT EVENTS`` (the SSE backend process)."""
    if len(argv) == 3 and argv[0] == "--sse-backend":
        from inferoute.gateway.serve import run_async

        async def serve() -> int:
            await _serve_sse(int(argv[1]), int(argv[2]))
            return 0

        run_async(serve)
        return
    raise SystemExit("usage: python -m inferoute.bench.gateway --sse-backend PORT EVENTS")


if __name__ == "__main__":
    _main(sys.argv[1:])
