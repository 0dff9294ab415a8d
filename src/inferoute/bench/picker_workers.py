"""``inferoute bench picker --workers 1,2``: the real ``inferoute epp --workers N`` program, measured for
scale and for routing quality in one run.

1. **decisions/s** -- ``inferoute epp --workers N`` (GIE default profile, scraping 3 trivial backends) driven
   by the pipelined ext_proc client over 16 connections (the kernel spreads connections, not streams, over
   the workers), 16 streams each; decisions per wall second and per CPU second of all workers together.
2. **routing quality** -- 4 in-process simulator replicas publishing KV events, 16 prefix groups whose
   working set is ~70% of the pool's KV capacity (placement must partition the groups), a closed loop of 8
   clients asking the picker over 8 connections and then sending the request to the chosen replica (as a
   gateway would, reporting the response back to the picker). Reported: the servers' prefix-cache hit rate
   and the request latency, for each profile and worker count. The precise profile's index comes from the
   KV events, so every worker knows what every replica holds; the approximate profile (gie-default) learns
   from its own decisions, so each worker knows only the half it placed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from inferoute.endpoints import Endpoint

READY = re.compile(
    rb"inferoute epp ready: ext_proc :(\d+), .* pids ([\d,]+)\)|inferoute epp ready: ext_proc :(\d+)"
)
GROUPS = 16
DOC_TOKENS = 1024
BLOCK = 16


@dataclass(frozen=True, slots=True)
class RunningEpp:
    port: int
    pids: list[int]


@contextlib.asynccontextmanager
async def running_epp(
    workers: int, profile: str, endpoints: Sequence[Endpoint], workdir: Path
) -> AsyncIterator[RunningEpp]:
    """``inferoute epp --workers N`` on free ports; yields its ext_proc port and the serving pids."""
    doc = [
        {"name": e.name, "address": e.address, "port": e.port, "labels": dict(e.labels)} for e in endpoints
    ]
    eps = workdir / f"endpoints-{workers}-{profile}.yaml"
    eps.write_text(yaml.safe_dump({"endpoints": doc}))
    log = workdir / f"epp-{workers}-{profile}.log"
    args = [
        "epp",
        "--workers",
        str(workers),
        "--profile",
        profile,
        "--endpoints",
        str(eps),
        "--insecure-serving",
    ]
    args += [
        "--host",
        "127.0.0.1",
        "--grpc-port",
        "0",
        "--health-port",
        "0",
        "--metrics-port",
        "0",
        "--grace",
        "0",
    ]
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "inferoute", *args, stdout=out, stderr=out
        )
    try:
        async with asyncio.timeout(90):
            while not (m := READY.search(log.read_bytes())):
                if proc.returncode is not None:
                    raise RuntimeError(f"inferoute epp exited: {log.read_text()[-2000:]}")
                await asyncio.sleep(0.1)
        if m[1] is not None:
            yield RunningEpp(int(m[1]), [int(p) for p in m[2].split(b",")])
        else:
            yield RunningEpp(int(m[3]), [proc.pid])
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()


# ------------------------------------------------------------------------------------------ 1. decisions/s


@dataclass
class ScaleResult:
    workers: int
    seconds: float
    decisions: int
    cpu_seconds: float
    per_worker_cpu: list[float]

    @property
    def per_wall_second(self) -> float:
        return self.decisions / self.seconds

    @property
    def per_cpu_second(self) -> float:
        return self.decisions / self.cpu_seconds if self.cpu_seconds else 0.0


async def scale_point(
    workers: int, backends: Sequence[int], workdir: Path, seconds: float, size: int, connections: int = 16
) -> ScaleResult:
    from inferoute.bench.picker import _cpu_seconds, _lifecycle, _PipelinedLoad

    eps = [Endpoint(f"127.0.0.1:{p}", "127.0.0.1", p) for p in backends]
    msgs = [x.SerializeToString() for x in _lifecycle(size)]
    loop = asyncio.get_running_loop()
    async with running_epp(workers, "gie-default", eps, workdir) as epp:
        conns = [
            await loop.create_connection(lambda: _PipelinedLoad(msgs, 16), "127.0.0.1", epp.port)
            for _ in range(connections)
        ]
        try:
            await asyncio.sleep(2.0)  # warm-up (and the first scrapes)
            for _, proto in conns:
                proto.measuring = True
            cpu0 = [_cpu_seconds(p) for p in epp.pids]
            t0 = time.perf_counter()
            await asyncio.sleep(seconds)
            elapsed = time.perf_counter() - t0
            cpu = [_cpu_seconds(p) - c for p, c in zip(epp.pids, cpu0, strict=True)]
            done = sum(proto.done for _, proto in conns)
        finally:
            for transport, _ in conns:
                transport.close()
    return ScaleResult(workers, elapsed, done, sum(cpu), cpu)


# --------------------------------------------------------------------------------------- 2. routing quality


@dataclass
class QualityResult:
    workers: int
    profile: str
    requests: int
    errors: int
    hit_rate: float
    latencies: list[float]

    def pct(self, q: float) -> float:
        from inferoute.bench.stats import percentile

        return percentile(self.latencies, q) * 1000 if self.latencies else float("nan")


def _documents(seed: int) -> list[str]:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "kappa", "sigma", "omega", "theta"]
    return [
        f"Group {g}. " + " ".join(rng.choice(words) + str(rng.randrange(100)) for _ in range(DOC_TOKENS // 2))
        for g in range(GROUPS)
    ]


def quality_sim_config() -> object:
    from inferoute.kvevents.config import KVEventsConfig
    from inferoute.sim import SimConfig

    # ~70% of the pool's KV capacity holds every group's document (4 replicas)
    blocks = int(GROUPS * (DOC_TOKENS + 64) / BLOCK / 0.7 / 4)
    kv = KVEventsConfig(
        enable_kv_cache_events=True,
        publisher="zmq",
        endpoint="tcp://127.0.0.1:*",
        replay_endpoint="tcp://127.0.0.1:*",
    )
    return SimConfig(time_scale=0.2, block_size=BLOCK, kv_cache_blocks=blocks, max_num_seqs=16, kv_events=kv)


async def quality_point(
    workers: int, profile: str, sims: object, workdir: Path, seconds: float, clients: int = 8, seed: int = 1
) -> QualityResult:
    import aiohttp

    from inferoute.bench import scrape
    from inferoute.extproc.channel import ChannelOptions
    from inferoute.extproc.client import GrpcPicker
    from inferoute.picking import Destination, PickRequest
    from inferoute.sim import DEFAULT_MODEL, SimPool

    assert isinstance(sims, SimPool)
    docs = _documents(seed)
    rng = random.Random(seed)
    latencies: list[float] = []
    errors = 0
    async with running_epp(workers, profile, sims.endpoints, workdir) as epp, aiohttp.ClientSession() as http:
        pickers = [
            GrpcPicker(ChannelOptions(f"127.0.0.1:{epp.port}", tls=False), timeout_ms=5000) for _ in range(8)
        ]
        before = await scrape.pool_counters(sims.urls)
        deadline = time.monotonic() + seconds
        count = 0

        async def client() -> None:
            nonlocal count, errors
            while time.monotonic() < deadline:
                count += 1
                picker = pickers[count % len(pickers)]
                content = f"{rng.choice(docs)} Question {count}?"
                body = {
                    "model": DEFAULT_MODEL,
                    "messages": [{"role": "user", "content": content}],
                    "max_tokens": 8,
                }
                raw = json.dumps(body).encode()
                t0 = time.perf_counter()
                try:
                    decision, session = await picker.pick(
                        PickRequest("POST", "/v1/chat/completions", {}, raw)
                    )
                    assert isinstance(decision, Destination)
                    served = decision.endpoints[0]
                    async with http.post(
                        f"http://{served}/v1/chat/completions",
                        data=raw,
                        headers={"content-type": "application/json"},
                    ) as r:
                        session.response_started(served, r.status, {})
                        await r.read()
                    session.response_finished()
                    latencies.append(time.perf_counter() - t0)
                except Exception:
                    errors += 1

        try:
            await asyncio.gather(*(client() for _ in range(clients)))
            after = await scrape.pool_counters(sims.urls)
        finally:
            for p in pickers:
                await p.aclose()
    hits = after.get("prefix_cache_hits", 0) - before.get("prefix_cache_hits", 0)
    queries = after.get("prefix_cache_queries", 0) - before.get("prefix_cache_queries", 0)
    return QualityResult(
        workers, profile, len(latencies), errors, hits / queries if queries else 0.0, latencies
    )


# ------------------------------------------------------------------------------------------------ report


def render(scale: list[ScaleResult], quality: list[QualityResult], conditions: str) -> str:
    lines = ["### inferoute epp --workers N", "", f"Conditions: {conditions}", ""]
    if scale:
        base = next((s for s in scale if s.workers == 1), scale[0])
        lines += [
            "#### Decisions per second (GIE default profile, 4 KB prompts, 16 connections x 16 streams, full "
            "lifecycle)",
            "",
            "| workers | decisions/s (wall) | vs 1 worker | decisions per CPU-second | CPU s per worker |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {s.workers} | {s.per_wall_second:,.0f} | {s.per_wall_second / base.per_wall_second:.2f}x | "
            f"{s.per_cpu_second:,.0f} | {', '.join(f'{c:.1f}' for c in s.per_worker_cpu)} |"
            for s in scale
        ]
        lines.append("")
    if quality:
        lines += [
            f"#### Routing quality ({GROUPS} prefix groups of {DOC_TOKENS} tokens, ~70% of 4 simulated "
            "replicas' KV capacity, 8 closed-loop clients over 8 picker connections)",
            "",
            "| profile | workers | requests | errors | prefix-cache hit rate | p50 ms | p90 ms |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {q.profile} | {q.workers} | {q.requests} | {q.errors} | {q.hit_rate:.1%} | {q.pct(50):.0f} | "
            f"{q.pct(90):.0f} |"
            for q in quality
        ]
        lines.append("")
    return "\n".join(lines)


async def run_workers_section(
    worker_counts: Sequence[int],
    backends: Sequence[int],
    workdir: Path,
    seconds: float,
    size: int,
    profiles: Sequence[str] = ("precise", "gie-default"),
    rounds: int = 1,
) -> str:
    """Both measurements for every worker count; ``rounds`` alternating repeats of the quality points."""
    from inferoute.sim import SimPool

    load0 = os.getloadavg()[0]
    scale = [await scale_point(n, backends, workdir, seconds, size) for n in worker_counts]
    quality: list[QualityResult] = []
    for r in range(rounds):
        for profile in profiles:
            for n in worker_counts:
                async with await SimPool.start(quality_sim_config(), replicas=4) as sims:  # type: ignore[arg-type]
                    quality.append(await quality_point(n, profile, sims, workdir, 2 * seconds, seed=1 + r))
    conditions = (
        f"{os.cpu_count()} CPUs shared with other work: load average {load0:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end; workers unpinned; load generator and simulators in the bench "
        f"process; {seconds:g} s per decisions point after a 2 s warm-up, {2 * seconds:g} s per quality "
        "point."
    )
    return render(scale, quality, conditions)
