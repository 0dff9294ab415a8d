"""``inferoute bench nginx``: what routing through the NGINX decider costs.

Contenders, all in front of the same backend (an NGINX ``return 200`` JSON answer, so the backend is never
the bottleneck) and driven by ``wrk`` with small JSON POSTs:

* ``direct`` -- the backend itself (the floor);
* ``nginx proxy_pass`` -- stock NGINX, one worker, ``proxy_pass`` to an ``upstream`` with keep-alive;
* ``nginx + decider (post_action reports)`` -- stock NGINX, one worker, the configuration of
  ``inferoute nginx-config``: every request is buffered, sent to ``inferoute gateway --mode nginx`` (BBR + the
  embedded picker), redirected to ``@inference`` and proxied to the backend; plus the post_action report;
* ``nginx + decider (syslog reports)`` -- the same with ``--report syslog`` (a UDP datagram per request);
* ``nginx + decider, --no-accounting`` -- the same without completion reports (what reporting
  costs);
* ``decider alone`` -- wrk straight at the decider: decisions per second of the Python process, no
  proxying and no reports (the sessions stay open; the process is stopped afterwards);
* ``inferoute gateway`` -- ``inferoute gateway`` alone (one worker process): BBR + the same embedded picker +
  its own Python proxy.

Two measurements per contender: throughput with ``--connections`` concurrent connections, and latency with
one connection (sequential requests) -- the *added latency* is its p50/p99 minus the direct one's. All
contenders run at once (idle but the measured one) and are measured in ``--rounds`` interleaved rounds; the
best round of each is reported (other load on a shared machine only ever slows a round down), every round
is kept in the JSON output.

The decider and the gateway run the real embedded picker (the GIE default profile); the backend answers
``/metrics`` with idle vLLM metrics so the picker sees a fresh, ready endpoint.

Then the streaming part: ``--sse-requests`` responses of ``--sse-events`` SSE events each (one write per
event, ``--sse-gap-ms`` apart), 16 at a time, through NGINX + decider and through the gateway; reported is the
CPU time the inferoute process (``/proc/PID/stat``) spent per response -- the decider's is one decision and
one report whatever the length, the gateway relays every event.

Every process is started by this command on free ports and stopped by its pid before it returns.
Needs ``wrk`` (Debian package ``wrk``) and ``nginx``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from inferoute.bench.peers import candidate_ports, owns_ports
from inferoute.cliparams import out_dir
from inferoute.integrations.nginx import NginxOptions, render

log = logging.getLogger(__name__)

BODY = json.dumps({"model": "bench-model", "messages": [{"role": "user", "content": "hello " * 20}]})
ANSWER = '{"id":"cmpl-1","object":"chat.completion","model":"bench-model","choices":[]}'
IDLE_METRICS = (
    'vllm:num_requests_running{model_name="bench-model"} 0\\n'
    'vllm:num_requests_waiting{model_name="bench-model"} 0\\n'
    'vllm:kv_cache_usage_perc{model_name="bench-model"} 0\\n'
)

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = %s
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%%d,"duration_us":%%d,"errors":%%d,"non2xx":%%d,"p50_us":%%d,"p90_us":%%d,"p99_us":%%d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
"""


@dataclass(slots=True)
class WrkResult:
    requests: int
    rps: float
    errors: int
    non2xx: int
    p50_ms: float
    p90_ms: float
    p99_ms: float


@dataclass(slots=True)
class ContenderResult:
    name: str
    throughput: WrkResult
    latency: WrkResult


def on_own_port(
    stack: ExitStack,
    start: Callable[[int], AbstractContextManager[subprocess.Popen[bytes]]],
    attempts: int = 4,
) -> tuple[int, subprocess.Popen[bytes]]:
    """Enter ``start(port)`` (a process told its port, listening when entered) on a candidate port, and keep
    it only when the process itself (or its child) then listens on that port; when the port went to another
    process in between (ours exits, or someone else answers), stop ours and try a new port."""
    for _ in range(attempts):
        port = candidate_ports(1)[0]
        attempt = ExitStack()
        try:
            proc = attempt.enter_context(start(port))
        except click.ClickException:
            attempt.close()
            continue
        if owns_ports(proc.pid, [port]):
            stack.enter_context(attempt)
            return port, proc
        attempt.close()
    raise click.ClickException(f"no process of ours came up on its own port in {attempts} attempts")


def wait_port(port: int, proc: subprocess.Popen[bytes], within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise click.ClickException(f"{proc.args!r} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise click.ClickException(f"nothing listens on port {port} after {within}s")


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Stop one process we started, by its pid."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def nginx_server(prefix: Path, http_body: str, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """A foreground NGINX master (own prefix, one worker) serving ``http_body``; stopped by pid (SIGQUIT)."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    for sub in ("logs", "temp/client_body", "temp/proxy", "temp/fastcgi", "temp/uwsgi", "temp/scgi"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    temp = "".join(f"{d}_temp_path temp/{d};\n" for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    user = "user root;\n" if os.geteuid() == 0 else ""
    if "http {" in http_body:  # a complete configuration (nginx-config --self-contained)
        conf = user + http_body
    else:
        conf = (
            f"{user}worker_processes 1;\npid nginx.pid;\nerror_log logs/error.log;\n"
            f"events {{ worker_connections 4096; }}\nhttp {{\n{temp}access_log off;\n{http_body}\n}}\n"
        )
    (prefix / "nginx.conf").write_text(conf)
    with open(prefix / "logs" / "stderr.log", "wb") as err:
        proc = subprocess.Popen(
            [nginx, "-p", f"{prefix}/", "-c", str(prefix / "nginx.conf"), "-g", "daemon off;"], stderr=err
        )
    try:
        wait_port(port, proc)
        yield proc
    finally:
        stop(proc, signal.SIGQUIT)


@contextmanager
def inferoute_process(args: list[str], port: int, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    exe = Path(sys.executable).with_name("inferoute")
    with open(log_path, "wb") as err:
        proc = subprocess.Popen([str(exe), *args], stderr=err)
    try:
        wait_port(port, proc)
        time.sleep(0.5)  # first metrics scrape of the picker
        yield proc
    finally:
        stop(proc)


def run_wrk(url: str, connections: int, duration: float, script: Path) -> WrkResult:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise click.ClickException("wrk is not installed (apt-get install wrk)")
    out = subprocess.run(
        [wrk, "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "-s", str(script), url],
        capture_output=True,
        text=True,
        timeout=duration + 60,
    )
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("{")), None)
    if out.returncode != 0 or line is None:
        raise click.ClickException(f"wrk failed: {out.stdout}\n{out.stderr}")
    data = json.loads(line)
    seconds = data["duration_us"] / 1e6
    return WrkResult(
        requests=data["requests"],
        rps=data["requests"] / seconds,
        errors=data["errors"],
        non2xx=data["non2xx"],
        p50_ms=data["p50_us"] / 1000,
        p90_ms=data["p90_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
    )


def measure(name: str, url: str, connections: int, duration: float, script: Path) -> ContenderResult:
    throughput = run_wrk(url, connections, duration, script)
    latency = run_wrk(url, 1, duration, script)
    log.info("%s: %.0f req/s, sequential p50 %.3f ms", name, throughput.rps, latency.p50_ms)
    return ContenderResult(name, throughput, latency)


def best_of(rounds: list[ContenderResult]) -> ContenderResult:
    """The least disturbed round of one contender: highest throughput, and the lowest sequential p50 round's
    latency figures (on a shared machine, interference only ever makes things slower)."""
    throughput = max((r.throughput for r in rounds), key=lambda t: t.rps)
    latency = min((r.latency for r in rounds), key=lambda t: t.p50_ms)
    return ContenderResult(rounds[0].name, throughput, latency)


def gateway_yaml(backend_port: int) -> str:
    return (
        "pool:\n"
        f"  endpoints: [{{name: backend, address: 127.0.0.1, port: {backend_port}}}]\n"
        "routes:\n"
        "  - path: /v1/\n"
        "access_log: false\n"
    )


def start_decider(stack: ExitStack, cfg: Path, log_path: Path) -> tuple[int, subprocess.Popen[bytes]]:
    """``inferoute gateway --mode nginx`` (the NGINX decider) on a port it is seen to hold."""
    return on_own_port(
        stack,
        lambda port: inferoute_process(
            ["gateway", "--mode", "nginx", "--config", str(cfg), "--listen", f"127.0.0.1:{port}"],
            port,
            log_path,
        ),
    )


def start_gateway(stack: ExitStack, cfg: Path, log_path: Path) -> tuple[int, subprocess.Popen[bytes]]:
    """``inferoute gateway`` on a port it is seen to hold."""
    return on_own_port(
        stack,
        lambda port: inferoute_process(
            ["gateway", "--config", str(cfg), "--listen", f"127.0.0.1:{port}"], port, log_path
        ),
    )


def _start_contenders(stack: ExitStack, work: Path, cfg: Path) -> tuple[int, int, int, list[int], int]:
    """The backend, the proxy_pass NGINX, the decider, the three decider fronts (post_action reports,
    syslog reports, no accounting) and the gateway, each on a port it is seen to hold, in the order their
    configurations need each other's ports."""

    def nginx(name: str, conf: Callable[[int], str]) -> int:
        return on_own_port(stack, lambda port: nginx_server(work / name, conf(port), port))[0]

    backend = nginx(
        "backend",
        lambda port: (
            f"server {{ listen 127.0.0.1:{port}; keepalive_requests 1000000;\n"
            f"  location /metrics {{ default_type text/plain; return 200 '{IDLE_METRICS}'; }}\n"
            f"  location / {{ default_type application/json; return 200 '{ANSWER}'; }} }}"
        ),
    )
    cfg.write_text(gateway_yaml(backend))
    proxy = nginx(
        "proxy",
        lambda port: (
            f"upstream backend {{ server 127.0.0.1:{backend}; keepalive 64; }}\n"
            f"server {{ listen 127.0.0.1:{port}; keepalive_requests 1000000;\n"
            "  location / { proxy_pass http://backend; proxy_http_version 1.1; "
            'proxy_set_header Connection ""; } }'
        ),
    )
    decider, _ = start_decider(stack, cfg, work / "decider.log")

    def front_conf(port: int, accounting: bool, report: str = "post_action") -> str:
        opts = NginxOptions(
            decider=f"127.0.0.1:{decider}",
            listen=f"127.0.0.1:{port}",
            self_contained=True,
            worker_processes="1",
            access_log="off",
            accounting=accounting,
            report=report,
        )
        return render(opts)

    fronts = [
        nginx("front", lambda port: front_conf(port, True)),
        nginx("front-syslog", lambda port: front_conf(port, True, "syslog")),
        nginx("front-noreport", lambda port: front_conf(port, False)),
    ]
    gateway, _ = start_gateway(stack, cfg, work / "gateway.log")
    return backend, proxy, decider, fronts, gateway


def run(duration: float, connections: int, out: Path, rounds: int = 1) -> list[ContenderResult]:
    """Start every contender, then measure them in ``rounds`` interleaved rounds (so that load from other
    processes on the machine hits all of them alike); report each contender's best round."""
    work = Path(tempfile.mkdtemp(prefix="inferoute-bench-nginx-"))
    script = work / "post.lua"
    script.write_text(WRK_SCRIPT % json.dumps(BODY))
    cfg = work / "gateway.yaml"
    path = "/v1/chat/completions"

    def url(port: int) -> str:
        return f"http://127.0.0.1:{port}{path}"

    load_before = os.getloadavg()
    with ExitStack() as stack:
        backend, proxy, decider, fronts, gateway = _start_contenders(stack, work, cfg)
        contenders = [
            ("direct (NGINX return 200)", url(backend)),
            ("nginx proxy_pass", url(proxy)),
            ("nginx + decider (post_action reports)", url(fronts[0])),
            ("nginx + decider (syslog reports)", url(fronts[1])),
            ("nginx + decider, --no-accounting", url(fronts[2])),
            ("decider alone (decisions only)", url(decider)),
            ("inferoute gateway", url(gateway)),
        ]
        measured: dict[str, list[ContenderResult]] = {name: [] for name, _ in contenders}
        for _, target in contenders:  # warm-up: keep-alive pools, picker caches
            run_wrk(target, connections, 1, script)
        for _ in range(rounds):
            for name, target in contenders:
                measured[name].append(measure(name, target, connections, duration, script))
    results = [best_of(measured[name]) for name, _ in contenders]
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "duration_s": duration,
        "connections": connections,
        "rounds": rounds,
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "best": [asdict(r) for r in results],
        "all_rounds": {name: [asdict(r) for r in rs] for name, rs in measured.items()},
    }
    (out / "nginx.json").write_text(json.dumps(meta, indent=2))
    (out / "nginx.md").write_text(markdown(results, connections))
    if any(
        r.throughput.errors + r.throughput.non2xx + r.latency.errors + r.latency.non2xx
        for rs in measured.values()
        for r in rs
    ):
        log.warning("errors seen: process logs kept in %s", work)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return results


# --- streaming: Python CPU per streamed response ---------------------------------------------------------

SSE_EVENT = b'data: {"choices":[{"delta":{"content":"tok"},"index":0}]}\n\n'


async def _sse_backend(port: int, events: int, gap: float) -> None:
    """A model-server stand-in streaming ``events`` SSE chunks per request, ``gap`` seconds apart (token by
    token, as a model server does: every event is its own write, usually its own TCP segment)."""
    from aiohttp import web

    async def stream(request: web.BaseRequest) -> web.StreamResponse:
        await request.read()
        if request.path == "/metrics":
            return web.Response(text=IDLE_METRICS.replace("\\n", "\n"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(events):
            await resp.write(SSE_EVENT)
            await asyncio.sleep(gap)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    runner = web.ServerRunner(web.Server(stream, access_log=None))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _stream_all(url: str, requests: int, concurrency: int) -> tuple[float, int]:
    """Send ``requests`` streaming POSTs, ``concurrency`` at a time; (wall seconds, bytes received)."""
    import aiohttp

    received = 0
    queue = list(range(requests))

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal received
        while queue:
            queue.pop()
            async with session.post(url, data=BODY, headers={"Content-Type": "application/json"}) as resp:
                if resp.status != 200:
                    raise click.ClickException(f"{url}: HTTP {resp.status}")
                async for chunk in resp.content.iter_any():
                    received += len(chunk)

    t0 = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return time.perf_counter() - t0, received


@dataclass(slots=True)
class StreamResult:
    name: str
    requests: int
    events_per_request: int
    wall_s: float
    python_cpu_ms_per_request: float


def run_streaming(
    work: Path, requests: int, concurrency: int, events: int, gap: float = 0.001
) -> list[StreamResult]:
    """CPU the inferoute process spends per streamed response: decider (NGINX streams) vs gateway (Python)."""
    cfg = work / "sse.yaml"
    path = "/v1/chat/completions"
    results: list[StreamResult] = []
    with ExitStack() as stack:
        sse, _ = on_own_port(stack, lambda port: sse_backend_process(port, events, gap))
        cfg.write_text(gateway_yaml(sse))
        decider, decider_proc = start_decider(stack, cfg, work / "sse-decider.log")

        def front_conf(port: int) -> str:
            return render(
                NginxOptions(
                    decider=f"127.0.0.1:{decider}",
                    listen=f"127.0.0.1:{port}",
                    self_contained=True,
                    worker_processes="1",
                    access_log="off",
                )
            )

        front, _ = on_own_port(stack, lambda port: nginx_server(work / "sse-front", front_conf(port), port))
        gateway, gateway_proc = start_gateway(stack, cfg, work / "sse-gateway.log")
        for name, port, proc in (
            ("nginx + inferoute decider", front, decider_proc),
            ("inferoute gateway", gateway, gateway_proc),
        ):
            url = f"http://127.0.0.1:{port}{path}"
            asyncio.run(_stream_all(url, concurrency, concurrency))  # warm-up
            cpu0 = cpu_seconds(proc.pid)
            wall, _ = asyncio.run(_stream_all(url, requests, concurrency))
            cpu = cpu_seconds(proc.pid) - cpu0
            results.append(StreamResult(name, requests, events, wall, 1000 * cpu / requests))
            log.info("%s: %.2f ms of Python CPU per streamed response", name, 1000 * cpu / requests)
    return results


@contextmanager
def sse_backend_process(port: int, events: int, gap: float) -> Iterator[subprocess.Popen[bytes]]:
    """The streaming model-server stand-in (this module's ``--sse-backend``) on ``port``."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "inferoute.bench.nginx", "--sse-backend", str(port), str(events), str(gap)]
    )
    try:
        wait_port(port, proc)
        yield proc
    finally:
        stop(proc)


def streaming_markdown(results: list[StreamResult], concurrency: int) -> str:
    lines = [
        f"| path ({concurrency} concurrent streams) | responses | SSE events each | wall s "
        "| inferoute process CPU ms per response |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.requests} | {r.events_per_request} | {r.wall_s:.2f} "
            f"| {r.python_cpu_ms_per_request:.2f} |"
        )
    return "\n".join(lines) + "\n"


def markdown(results: list[ContenderResult], connections: int) -> str:
    """The results table (added latency relative to the first contender, the direct backend)."""
    base = results[0].latency
    lines = [
        f"| path | req/s ({connections} conn) | p50 / p99 ms ({connections} conn) | sequential p50 / p99 ms "
        "| added p50 / p99 ms | errors (socket / non-2xx) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        t, lat = r.throughput, r.latency
        added = f"{lat.p50_ms - base.p50_ms:+.3f} / {lat.p99_ms - base.p99_ms:+.3f}"
        errors = f"{t.errors + lat.errors} / {t.non2xx + lat.non2xx}"
        loaded = f"{t.p50_ms:.2f} / {t.p99_ms:.2f}"
        sequential = f"{lat.p50_ms:.3f} / {lat.p99_ms:.3f}"
        lines.append(f"| {r.name} | {t.rps:,.0f} | {loaded} | {sequential} | {added} | {errors} |")
    return "\n".join(lines) + "\n"


@click.command("nginx")
@click.option(
    "--duration",
    type=click.FloatRange(0, min_open=True),
    default=5.0,
    show_default=True,
    help="Seconds per measurement.",
)
@click.option(
    "--connections", type=click.IntRange(min=1), default=16, show_default=True, help="Concurrent connections."
)
@click.option(
    "--rounds",
    type=click.IntRange(min=0),
    default=3,
    show_default=True,
    help="Interleaved rounds; the best is kept (0: streaming part only).",
)
@click.option(
    "--sse-events",
    type=click.IntRange(min=1),
    default=500,
    show_default=True,
    help="Events per streamed response.",
)
@click.option(
    "--sse-requests",
    type=click.IntRange(min=0),
    default=400,
    show_default=True,
    help="Streamed responses (0: skip).",
)
@click.option(
    "--sse-gap-ms",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Milliseconds between events.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    callback=out_dir,
    default=Path("bench-results"),
    show_default=True,
    help="Directory for the JSON results and the Markdown report.",
)
def command(
    duration: float,
    connections: int,
    rounds: int,
    sse_events: int,
    sse_requests: int,
    sse_gap_ms: float,
    out: Path,
) -> None:
    """NGINX + decider vs NGINX proxy_pass vs the inferoute gateway: added latency and requests/s."""
    if rounds > 0:
        results = run(duration, connections, out, rounds)
        click.echo(markdown(results, connections))
    if sse_requests:
        work = Path(tempfile.mkdtemp(prefix="inferoute-bench-nginx-sse-"))
        streaming = run_streaming(work, sse_requests, connections, sse_events, sse_gap_ms / 1000)
        text = streaming_markdown(streaming, connections)
        out.mkdir(parents=True, exist_ok=True)
        (out / "nginx-streaming.md").write_text(text)
        (out / "nginx-streaming.json").write_text(json.dumps([asdict(r) for r in streaming], indent=2))
        shutil.rmtree(work, ignore_errors=True)
        click.echo(text)


def _main() -> None:
    """``python -m inferoute.bench.nginx --sse-backend PORT EVENTS`` (the streaming benchmark's backend)."""
    if len(sys.argv) == 5 and sys.argv[1] == "--sse-backend":
        import uvloop

        with contextlib.suppress(KeyboardInterrupt):
            uvloop.run(_sse_backend(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])))
        return
    raise SystemExit("usage: python -m inferoute.bench.nginx --sse-backend PORT EVENTS GAP_SECONDS")


__all__ = ["ContenderResult", "StreamResult", "WrkResult", "command", "markdown", "run", "run_streaming"]

if __name__ == "__main__":
    _main()
