"""``inferoute bench sim``: how faithfully the simulator keeps its own token schedule under load.

The simulator runs in its own process (``inferoute sim --emit-schedule``), pinned to one CPU when the machine
has two or more; this process is the client, pinned to another CPU. For each level N of concurrent streams,
N client tasks each send streaming completions back to back (``ignore_eos``, fixed ``max_tokens``), spread
over the replicas, for ``--duration`` seconds. Every streamed chunk carries ``sim_scheduled_at`` (the
engine's planned time for that token) and ``sim_written_at`` (when the server wrote it), CLOCK_MONOTONIC
seconds, which on Linux is one clock for all processes. The client timestamps each read as it arrives, so

* delay   = arrival - scheduled   (what a client sees: the simulator's lateness plus loopback and client)
* server  = written - scheduled   (the simulator's own lateness: event loop and handler scheduling)

are measured per token, after a warm-up. The sweep reports p50/p90/p99/max and the simulator's CPU use,
and the largest N whose p99 delay stays under the target (5 ms by default).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click

_SCHED = re.compile(rb'"sim_scheduled_at":([0-9.]+),"sim_written_at":([0-9.]+)')


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of already sorted ``values``, linear interpolation; NaN if empty."""
    if not values:
        return math.nan
    pos = (len(values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def token_stamps(reads: Sequence[tuple[float, bytes]]) -> list[tuple[float, float, float]]:
    """``(arrival, scheduled, written)`` per token from timestamped raw reads of one SSE stream.

    A token's arrival is the time of the read that completed its line (chunks can straddle reads).
    """
    out: list[tuple[float, float, float]] = []
    pending = b""
    for arrival, data in reads:
        pending += data
        cut = pending.rfind(b"\n")
        if cut < 0:
            continue
        complete, pending = pending[: cut + 1], pending[cut + 1 :]
        for m in _SCHED.finditer(complete):
            out.append((arrival, float(m.group(1)), float(m.group(2))))
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
    sim_cpu_pct: float = math.nan
    notes: list[str] = field(default_factory=list)


def summarize(
    streams: int,
    stamps: Sequence[tuple[float, float, float]],
    window: tuple[float, float],
    requests: int,
    errors: int,
    sim_cpu_pct: float,
) -> Level:
    """Reduce per-token stamps to a :class:`Level`, keeping tokens scheduled inside ``window``."""
    start, end = window
    kept = [s for s in stamps if start <= s[1] <= end]
    delay = sorted((a - s) * 1000 for a, s, _ in kept)
    server = sorted((w - s) * 1000 for _, s, w in kept)
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
        sim_cpu_pct=sim_cpu_pct,
    )


def max_sustained(levels: Sequence[Level], target_ms: float) -> int:
    """The largest stream count whose p99 delay is under ``target_ms`` with no errors (0 if none)."""
    ok = [lv.streams for lv in levels if lv.delay_p99_ms < target_ms and lv.errors == 0 and lv.tokens > 0]
    return max(ok, default=0)


def markdown(levels: Sequence[Level], target_ms: float) -> str:
    """A Markdown table of the sweep."""
    rows = [
        "| streams | tokens/s | delay p50 | p90 | p99 | max | server p50 | server p99 | sim CPU | errors |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lv in levels:
        mark = "" if lv.delay_p99_ms < target_ms else " ✗"
        rows.append(
            f"| {lv.streams} | {lv.tokens_per_s:,.0f} | {lv.delay_p50_ms:.2f} ms | {lv.delay_p90_ms:.2f} ms"
            f" | {lv.delay_p99_ms:.2f} ms{mark} | {lv.delay_max_ms:.1f} ms | {lv.server_p50_ms:.2f} ms"
            f" | {lv.server_p99_ms:.2f} ms | {lv.sim_cpu_pct:.0f}% | {lv.errors} |"
        )
    return "\n".join(rows)


# -- I/O --------------------------------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _start_sim(
    replicas: int, time_scale: float, max_seqs: int, cpu: int | None, extra: Sequence[str]
) -> tuple[asyncio.subprocess.Process, list[str]]:
    proc = await asyncio.create_subprocess_exec(
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
        "--max-waiting",
        "100000",
        "--emit-schedule",
        *extra,
        stdout=asyncio.subprocess.PIPE,
    )
    if cpu is not None:
        os.sched_setaffinity(proc.pid, {cpu})
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    if not line:
        raise click.ClickException("the simulator exited before listening")
    urls = ["http://" + part.split("=", 1)[1] for part in line.decode().split()]
    return proc, urls


async def _stream_forever(
    session: Any,
    url: str,
    model: str,
    max_tokens: int,
    ident: int,
    sink: list[list[tuple[float, bytes]]],
    counts: list[int],
) -> None:
    k = 0
    clock = time.monotonic
    while True:
        k += 1
        body = {
            "model": model,
            "prompt": f"fidelity stream {ident} request {k}",
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "stream": True,
        }
        reads: list[tuple[float, bytes]] = []
        sink.append(reads)
        try:
            async with session.post(url + "/v1/completions", json=body) as resp:
                if resp.status != 200:
                    counts[1] += 1
                    await resp.read()
                    continue
                async for data in resp.content.iter_any():
                    reads.append((clock(), data))
            counts[0] += 1
        except (TimeoutError, OSError) as exc:
            counts[1] += 1
            print(f"stream {ident}: {exc!r}", file=sys.stderr)
            await asyncio.sleep(0.05)


async def _run_level(
    urls: Sequence[str], pid: int, model: str, streams: int, duration: float, warmup: float, max_tokens: int
) -> Level:
    import aiohttp

    sink: list[list[tuple[float, bytes]]] = []
    counts = [0, 0]
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=None)
    ) as session:
        tasks = [
            asyncio.create_task(
                _stream_forever(session, urls[i % len(urls)], model, max_tokens, i, sink, counts)
            )
            for i in range(streams)
        ]
        try:
            t0 = time.monotonic()
            await asyncio.sleep(warmup)
            cpu0, w0 = _cpu_seconds(pid), time.monotonic()
            await asyncio.sleep(duration)
            cpu1, w1 = _cpu_seconds(pid), time.monotonic()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    stamps = [s for reads in sink for s in token_stamps(reads)]
    level = summarize(
        streams, stamps, (t0 + warmup, w1), counts[0], counts[1], 100 * (cpu1 - cpu0) / (w1 - w0)
    )
    await asyncio.sleep(0.5)  # let the simulator drain the aborted streams before the next level
    return level


async def _bench(
    levels: Sequence[int],
    replicas: int,
    duration: float,
    warmup: float,
    max_tokens: int,
    time_scale: float,
    target_ms: float,
    pin: bool,
    extra: Sequence[str],
) -> list[Level]:
    from inferoute.sim.config import DEFAULT_MODEL

    cpus = sorted(os.sched_getaffinity(0))
    sim_cpu = cpus[0] if pin and len(cpus) >= 2 else None
    if sim_cpu is not None:
        os.sched_setaffinity(0, set(cpus[1:]))
    proc, urls = await _start_sim(replicas, time_scale, max(levels), sim_cpu, extra)
    results: list[Level] = []
    try:
        for n in levels:
            lv = await _run_level(urls, proc.pid, DEFAULT_MODEL, n, duration, warmup, max_tokens)
            results.append(lv)
            click.echo(
                f"streams={n:5d}  tokens/s={lv.tokens_per_s:9.0f}  delay p50={lv.delay_p50_ms:6.2f} "
                f"p99={lv.delay_p99_ms:7.2f} max={lv.delay_max_ms:7.1f} ms  server p99="
                f"{lv.server_p99_ms:6.2f} ms  sim cpu={lv.sim_cpu_pct:4.0f}%  errors={lv.errors}"
            )
    finally:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        if sim_cpu is not None:
            os.sched_setaffinity(0, set(cpus))
    return results


@click.command()
@click.option(
    "--streams",
    default="50,100,200,400,800",
    show_default=True,
    help="Comma-separated concurrent stream counts.",
)
@click.option(
    "--replicas",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Simulator replicas in the one process (streams are spread over them).",
)
@click.option("--duration", default=8.0, show_default=True, type=float, help="Measured seconds per level.")
@click.option("--warmup", default=2.0, show_default=True, type=float, help="Unmeasured seconds per level.")
@click.option("--max-tokens", default=200, show_default=True, type=click.IntRange(min=1))
@click.option("--time-scale", default=1.0, show_default=True, type=float)
@click.option("--target-ms", default=5.0, show_default=True, type=float, help="p99 delay target.")
@click.option(
    "--pin/--no-pin",
    default=True,
    show_default=True,
    help="Pin the simulator to the first allowed CPU and the client to the others.",
)
@click.option("--out", default="bench-results/sim-fidelity.json", show_default=True, type=click.Path())
def command(
    streams: str,
    replicas: int,
    duration: float,
    warmup: float,
    max_tokens: int,
    time_scale: float,
    target_ms: float,
    pin: bool,
    out: str,
) -> None:
    """Token timing fidelity of `inferoute sim`: delay between each token's scheduled time and its arrival."""
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover - uvloop is a dependency
        runner = asyncio.Runner()
    levels = [int(s) for s in streams.split(",") if s.strip()]
    with runner:
        results = runner.run(
            _bench(levels, replicas, duration, warmup, max_tokens, time_scale, target_ms, pin, ())
        )
    best = max_sustained(results, target_ms)
    table = markdown(results, target_ms)
    click.echo("\n" + table)
    click.echo(f"\nmax streams with p99 delay < {target_ms:g} ms: {best}")
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": " ".join(["inferoute", "bench", "sim", *sys.argv[3:]]),
        "replicas": replicas,
        "duration_s": duration,
        "warmup_s": warmup,
        "max_tokens": max_tokens,
        "time_scale": time_scale,
        "target_ms": target_ms,
        "pinned": pin,
        "cpus": os.cpu_count(),
        "max_sustained_streams": best,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path.write_text(json.dumps({"meta": meta, "levels": [asdict(lv) for lv in results]}, indent=2) + "\n")
    click.echo(f"results: {path}")
