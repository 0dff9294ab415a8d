"""``inferoute bench routing``: routing quality of every contender, on the same seeded workloads, in one run.

Theory of operation. For each workload, rate and contender (a *point*) the runner

1. starts a fresh simulator pool (``inferoute sim``, own process, cold caches, the same seed for everyone),
2. starts the contender's router (``inferoute gateway`` with a picker profile, ``vllm-router`` or
   ``sglang-router``, own process) in front of it — or, with ``--router-replicas N``, N independent
   instances of it (own ports, own picker state, own log), as a production deployment runs them,
3. sends the workload's seeded plan open-loop from this process (:mod:`inferoute.bench.loadgen`), spread
   over the router instances per request as an L4 load balancer (a Kubernetes Service) would, with the same
   seeded assignment for every contender,
4. scrapes the pool's server counters before and after, stops router and pool, and summarises the point
   with the warm-up left out (:mod:`inferoute.bench.stats`).

At the end it writes ``run.json``, ``summary.csv``, ``requests.csv``, PNG plots and ``summary.md`` to
``--out``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import platform
import shlex
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from inferoute.bench import report, scrape
from inferoute.bench.cpu import CpuProbe
from inferoute.bench.loadgen import LoadOptions, RequestResult, run_plan
from inferoute.bench.peers import (
    BASELINE,
    Contender,
    ManagedProcess,
    RedisProcess,
    select_contenders,
    start_redis,
    start_router,
    start_sim_pool,
)
from inferoute.bench.stats import (
    PointSummary,
    TargetCheck,
    capacity_at_slo,
    check_kv_pressure,
    check_lora_waits,
    check_shared_prefix,
    group_stats,
    server_delta,
    summarize,
)
from inferoute.bench.workloads import WORKLOADS, PlannedRequest, SimSizing, Workload, get_workload
from inferoute.cliparams import out_dir as out_dir_check
from inferoute.errors import InferouteError

log = logging.getLogger(__name__)

DEFAULT_RATES: dict[str, tuple[float, ...]] = {
    # Light load to past round-robin's saturation on 4 simulated H100s (docs/benchmarks/routing.md).
    "shared-prefix": (3.0, 6.0, 9.0, 12.0, 15.0),
    "multi-lora": (4.0, 8.0, 12.0),
    "long-prompt": (0.5, 1.0, 2.0),
    "bursty": (3.0, 6.0, 9.0),
    # ~32 req/s capacity on 4 replicas x 8 sequences (~1 s per request): 1.5x and 2x.
    "overload": (48.0, 64.0),
    "kv-pressure": (4.0, 8.0, 12.0, 16.0, 20.0),
}
OVERLOAD_CONTENDERS = "inferoute/round-robin,inferoute/objectives,inferoute/flow-control"
SLO_TTFT_P90 = 1.0
"""The p90 TTFT bound of the capacity-at-SLO figure, in modelled-H100 seconds (x ``--time-scale`` on the
wall clock)."""
QUICK_RATES: tuple[float, ...] = (2.0, 5.0)
QUICK_CONTENDERS = "inferoute/round-robin,inferoute/gie-default,vllm-router/round_robin"


@dataclass(slots=True)
class RunConfig:
    """Everything that defines a run (recorded in ``run.json``)."""

    workloads: list[str]
    rates: dict[str, list[float]]
    contenders: list[Contender]
    duration: float = 20.0
    warmup: float = 6.0
    replicas: int = 4
    router_replicas: int = 1
    """Independent instances of each contender's router in front of the same pool; the load generator
    spreads the requests over them per request (:func:`inferoute.bench.loadgen.l4_spread`, seeded by
    ``seed``)."""
    router_sync: bool = True
    """With several router replicas, our instances share in-flight load and prefix placements through a
    redis-server the benchmark starts for each point (``inferoute gateway``'s ``picker.sync_redis``, the
    documented HA deployment); False: independent instances, like the peers'."""
    time_scale: float = 1.0
    seed: int = 42
    out_dir: Path = Path("bench-results/routing")
    quick: bool = False
    request_timeout: float = 180.0
    warmup_rate: float | None = None
    """Offered rate during the warm-up (None: the point's rate). Below capacity, the cold caches' first misses
    leave no backlog: the measured window then starts from a warm steady state instead of draining it."""
    kv_cache_blocks: int | None = None
    """Overrides the workloads' KV sizing of each replica (e.g. a cache so large every prefix stays: the
    compute-bound ceiling of a pool, whatever the router)."""
    slo_ttft: float = SLO_TTFT_P90
    """p90 TTFT bound of the capacity figure, modelled-H100 seconds; the wall-clock bound is x time_scale."""
    command: str = ""
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def sizing(self, workload: Workload) -> SimSizing:
        """The simulator pool for ``workload`` (its own sizing unless ``kv_cache_blocks`` overrides it)."""
        sizing = workload.sizing(self.replicas)
        if self.kv_cache_blocks is not None:
            sizing = dataclasses.replace(sizing, kv_cache_blocks=self.kv_cache_blocks)
        return sizing

    def plan(self, workload: Workload, rate: float) -> list[PlannedRequest]:
        """The point's requests: ``rate`` over ``duration``; with ``warmup_rate``, that rate until ``warmup``
        and ``rate`` after it (the measured requests are the same either way)."""
        plan = workload.plan(rate, self.duration, self.seed)
        if self.warmup_rate is None:
            return plan
        warm = [r for r in workload.plan(self.warmup_rate, self.duration, self.seed) if r.at < self.warmup]
        return [
            dataclasses.replace(r, index=i)
            for i, r in enumerate(warm + [r for r in plan if r.at >= self.warmup])
        ]

    @property
    def slo_wall(self) -> float:
        """The SLO bound on the wall clock: a simulated engine ``time_scale`` times slower takes as much
        longer to the same first token."""
        return self.slo_ttft * self.time_scale

    def points(self) -> list[tuple[str, float, Contender]]:
        return [(w, r, c) for w in self.workloads for r in self.rates[w] for c in self.contenders]

    def meta(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "workloads": self.workloads,
            "rates": self.rates,
            "contenders": [c.name for c in self.contenders],
            "duration_s": self.duration,
            "warmup_s": self.warmup,
            "replicas": self.replicas,
            "router_replicas": self.router_replicas,
            "router_sync": self.router_sync and self.router_replicas > 1,  # nothing to sync with one
            "time_scale": self.time_scale,
            "slo_ttft_p90_s": self.slo_ttft,
            "kv_cache_blocks": self.kv_cache_blocks,
            "warmup_rate": self.warmup_rate,
            "seed": self.seed,
            "quick": self.quick,
            "started": self.started,
            "machine": f"{platform.system()} {platform.machine()}, python {platform.python_version()}",
        }


@dataclass(slots=True)
class PointResult:
    summary: PointSummary
    results: list[RequestResult] = field(default_factory=list)


ProgressHook = Callable[[str, int, int], None]
"""(description, completed requests, planned requests) during a point."""


async def run_point(
    cfg: RunConfig,
    workload: Workload,
    rate: float,
    contender: Contender,
    workdir: Path,
    progress: ProgressHook | None = None,
) -> PointResult:
    """One contender x workload x rate: fresh pool, fresh router, same seeded plan."""
    sizing = cfg.sizing(workload)
    # every pool publishes KV events (same simulator cost for every contender); only precise reads them
    tag = f"{workload.name}-{rate:g}-{contender.name.replace('/', '-')}"
    sim: ManagedProcess | None = None
    redis: RedisProcess | None = None
    routers: list[ManagedProcess] = []
    plan = cfg.plan(workload, rate)
    done = 0

    def on_done(_: RequestResult) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(tag, done, len(plan))

    try:
        sim, pool = await start_sim_pool(
            f"sim[{tag}]",
            sizing,
            cfg.time_scale,
            cfg.seed,
            workdir / "logs" / f"{tag}-sim.log",
            kv_events=True,
        )
        sync_url = None
        if contender.is_ours and cfg.router_replicas > 1 and cfg.router_sync:
            redis = await start_redis(f"redis[{tag}]", workdir / "redis" / tag)
            sync_url = redis.url
        router_urls = []
        for i in range(cfg.router_replicas):  # one after another: each on ports it is seen to hold
            one = "" if cfg.router_replicas == 1 else f"-{i}"
            router, url = await start_router(
                contender,
                f"{contender.name}[{tag}]{one}",
                pool.urls,
                workdir,
                workdir / "logs" / f"{tag}-router{one}.log",
                pool.labels(),
                time_scale=cfg.time_scale,
                instance=i,
                sync_redis=sync_url,
            )
            routers.append(router)
            router_urls.append(url)
        before = await scrape.pool_counters(pool.urls)
        sampler = scrape.LoraWaitSampler(pool.urls if sizing.lora_adapters else [])
        probe = cpu_probe(sim, [*routers, *([redis] if redis is not None else [])])
        async with sampler:
            probe.start()
            results = await run_plan(
                router_urls,
                plan,
                options=LoadOptions(request_timeout=cfg.request_timeout),
                on_done=on_done,
                spread_seed=cfg.seed,
            )
            cpu = probe.finish()
        after = await scrape.pool_counters(pool.urls)
    finally:
        for proc in (*routers, sim, redis):
            if proc is not None:
                await proc.stop()
    summary = summarize(contender.name, workload.name, rate, results, cfg.warmup, cfg.duration)
    summary.server = server_delta(before, after)
    summary.cpu = cpu
    if workload.per_group:
        summary.groups = group_stats(results, cfg.warmup)
    if sizing.lora_adapters:
        summary.server[scrape.LORA_WAIT_SECONDS] = sampler.adapter_seconds
    return PointResult(summary, results)


def cpu_probe(sim: ManagedProcess, routers: Sequence[ManagedProcess]) -> CpuProbe:
    """CPU used and waited for by the pool, the router (every instance and their sync store, summed) and this
    process (the load generator)."""
    roles = {
        "sim": [sim.proc.pid] if sim.proc is not None else [],
        "router": [r.proc.pid for r in routers if r.proc is not None],
    }
    return CpuProbe({**roles, "loadgen": [os.getpid()]}, shallow=frozenset({"loadgen"}))


async def run_benchmark(
    cfg: RunConfig,
    progress: ProgressHook | None = None,
    on_point: Callable[[PointSummary], None] | None = None,
) -> list[PointSummary]:
    """Run every point of ``cfg`` and write the reports; returns the point summaries."""
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    workloads = {name: get_workload(name, quick=cfg.quick) for name in cfg.workloads}
    requests_csv = report.RequestCsv(cfg.out_dir / "requests.csv")
    points: list[PointSummary] = []
    for wname, rate, contender in cfg.points():
        result = await run_point(cfg, workloads[wname], rate, contender, cfg.out_dir, progress)
        requests_csv.append(wname, contender.name, rate, result.results)
        points.append(result.summary)
        if on_point is not None:
            on_point(result.summary)
        write_reports(cfg, workloads, points, plots=False)  # partial results survive an interrupted run
    write_reports(cfg, workloads, points, plots=True)
    return points


def evaluate_targets(cfg: RunConfig, points: Sequence[PointSummary]) -> dict[str, list[TargetCheck]]:
    ours = [c.name for c in cfg.contenders if c.is_ours and c.name != BASELINE]
    peers = [c.name for c in cfg.contenders if not c.is_ours]
    out: dict[str, list[TargetCheck]] = {}
    sp = [p for p in points if p.workload == "shared-prefix"]
    if sp:
        rate, checks = check_shared_prefix(sp, BASELINE, ours, peers)
        if rate is not None:
            checks.insert(0, TargetCheck("compared at round-robin's knee", True, f"{rate:g} req/s"))
        out["shared-prefix"] = checks
    ml = [p for p in points if p.workload == "multi-lora"]
    if ml:
        counter = lora_wait_measure(ml)
        out["multi-lora"] = check_lora_waits(ml, ours, peers, counter)
    kv = [p for p in points if p.workload == "kv-pressure"]
    if kv:
        out["kv-pressure"] = check_kv_pressure(kv, ours, peers, cfg.slo_wall)
    return out


LORA_COLUMNS = [
    (scrape.LORA_WAITS, "slot waits"),
    (scrape.LORA_LOADS, "adapter loads"),
    (scrape.LORA_WAIT_SECONDS, "adapter-wait s"),
]
LORA_CHARTS = [
    (scrape.LORA_WAITS, "requests that waited for a LoRA slot"),
    (scrape.LORA_WAIT_SECONDS, "adapter-seconds waiting for a slot (sampled)"),
]


def lora_wait_measure(points: Sequence[PointSummary]) -> str:
    """The simulator's slot-wait counter when it exports one, else the sampled adapter-seconds."""
    if any(scrape.LORA_WAITS in p.server for p in points):
        return scrape.LORA_WAITS
    return scrape.LORA_WAIT_SECONDS


def write_reports(
    cfg: RunConfig, workloads: dict[str, Workload], points: Sequence[PointSummary], plots: bool
) -> str:
    """Write run.json, summary.csv and summary.md (and the PNGs when ``plots``); returns the markdown."""
    knees = {w: report.knees_for([p for p in points if p.workload == w]) for w in cfg.workloads}
    targets = evaluate_targets(cfg, points)
    meta = cfg.meta()
    meta["workload_parameters"] = {n: w.parameters() for n, w in workloads.items()}
    meta["sim_sizing"] = {n: cfg.sizing(w).describe() for n, w in workloads.items()}
    report.write_json(cfg.out_dir / "run.json", meta, points, knees, targets)
    report.write_summary_csv(cfg.out_dir / "summary.csv", points)
    sections = [
        f"# Routing benchmark\n\n`{cfg.command}`\n\n{cfg.replicas} simulated replicas, "
        + (
            f"{cfg.router_replicas} instances of each router (requests spread over them per request, "
            "seeded: the same for every contender; "
            + (
                "inferoute's instances share in-flight load and prefix placements through Redis), "
                if cfg.router_sync
                else "every instance on its own), "
            )
            if cfg.router_replicas > 1
            else ""
        )
        + f"time scale {cfg.time_scale:g}, {cfg.duration:g} s per point ({cfg.warmup:g} s warm-up excluded"
        + (f", offered at {cfg.warmup_rate:g} req/s" if cfg.warmup_rate is not None else "")
        + f"), seed {cfg.seed}.\n"
    ]
    for w in cfg.workloads:
        wl = workloads[w]
        lora = bool(cfg.sizing(wl).lora_adapters)
        columns = LORA_COLUMNS if lora else []
        sections.append(
            f"## {w}\n\n{wl.summary}. Parameters: `{json.dumps(wl.parameters())}`. Pool: "
            f"{cfg.sizing(wl).describe()}.\n"
        )
        sections.append(report.markdown_tables(w, points, knees[w], columns))
        if wl.per_group:
            sections.append(group_table([p for p in points if p.workload == w]))
        mine = [p for p in points if p.workload == w]
        sections.append(capacity_table(mine, cfg.slo_wall, cfg.time_scale))
        sections.append(cpu_table(mine))
        if w in targets:
            sections.append("Targets:\n\n" + report.markdown_targets(targets[w]))
        if plots and any(p.workload == w for p in points):
            note = f"{cfg.replicas} sim replicas, time-scale {cfg.time_scale:g}"
            charts = LORA_CHARTS if lora else []
            for path in report.plot_workload(cfg.out_dir, w, points, note, charts):
                sections.append(f"![{path.stem}]({path.name})\n")
    text = "\n".join(sections)
    (cfg.out_dir / "summary.md").write_text(text)
    return text


def group_table(points: Sequence[PointSummary]) -> str:
    """Per request group: p90 TTFT, goodput and 429s of every point."""
    rows = [
        "| contender | rate | group | p90 TTFT (ms) | goodput (req/s) | ok | 429s |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in points:
        for group, g in p.groups.items():
            ttft = g.get("ttft_p90")
            shown = "-" if ttft is None or ttft != ttft else f"{ttft * 1000:.0f}"
            rows.append(
                f"| {p.contender} | {p.rate:g} | {group} | {shown} | {g.get('goodput') or 0:.1f} | "
                f"{g.get('ok') or 0:.0f} | {g.get('rejected') or 0:.0f} |"
            )
    return "Per group:\n\n" + "\n".join(rows) + "\n"


def capacity_table(points: Sequence[PointSummary], slo: float = SLO_TTFT_P90, time_scale: float = 1.0) -> str:
    """Markdown: each contender's capacity at the SLO (``slo``: wall-clock seconds), best first; with a
    ``time_scale`` other than 1 also in modelled-H100 terms (rate x time scale, bound / time scale)."""
    by: dict[str, list[PointSummary]] = {}
    for p in points:
        by.setdefault(p.contender, []).append(p)
    if not by:
        return ""
    rows = sorted(((capacity_at_slo(ps, slo), name) for name, ps in by.items()), reverse=True)
    highest = max(p.rate for p in points)
    scaled = time_scale != 1.0
    lines = [
        f"Capacity at p90 TTFT < {slo:g} s (highest rate with every lower rate also under it"
        + (
            f"; time scale {time_scale:g}: {slo / time_scale:g} s and rate x {time_scale:g} at H100 speed"
            if scaled
            else ""
        )
        + "):\n"
    ]
    lines += [
        "| contender | capacity (req/s) |" + (" H100-equivalent (req/s) |" if scaled else ""),
        "|---|---|" + ("---|" if scaled else ""),
    ]
    for cap, name in rows:
        shown = f"≥ {cap:g}" if cap == highest else f"{cap:g}"  # not reached in the measured range
        lines.append(
            f"| {name} | {shown} |"
            + (f" {'≥ ' if cap == highest else ''}{cap * time_scale:g} |" if scaled else "")
        )
    return "\n".join(lines) + "\n"


def cpu_table(points: Sequence[PointSummary]) -> str:
    """Markdown: per point, the cores the pool, router and load generator used and how long they waited
    for a CPU (run-queue seconds per second), the machine's busy share and load average."""
    rows = [p for p in points if p.cpu]
    if not rows:
        return ""
    lines = [
        "CPU during each point's traffic (cores used / run-queue wait per second; machine busy share; "
        "load average):\n",
        "| contender | rate | sim | router | load generator | machine busy | load1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in rows:
        c = p.cpu
        cells = [
            f"{c.get(r + '_cpu', math.nan):.2f} / {c.get(r + '_wait', math.nan):.3f}"
            for r in ("sim", "router", "loadgen")
        ]
        lines.append(
            f"| {p.contender} | {p.rate:g} | "
            + " | ".join(cells)
            + f" | {c.get('machine_busy', math.nan):.0%} | {c.get('load1', math.nan):.1f} |"
        )
    return "\n".join(lines) + "\n"


def rebuild_reports(run_jsons: Sequence[Path], out_dir: Path | None = None) -> str:
    """Re-write summary.md, summary.csv and the plots from finished runs' ``run.json`` files (into
    ``out_dir``, default the first file's directory). Several files (e.g. a few rates each, to keep every
    invocation short) merge into one report; they must share seed, time scale, point length and pool.
    A (workload, contender, rate) measured twice keeps the later file's point."""
    meta, points = report.load_points(run_jsons[0])
    _old_run_defaults(meta)
    for path in run_jsons[1:]:
        more_meta, more = report.load_points(path)
        _old_run_defaults(more_meta)
        keys = (
            "seed",
            "time_scale",
            "duration_s",
            "warmup_s",
            "replicas",
            "router_replicas",
            "router_sync",
            "kv_cache_blocks",
            "warmup_rate",
        )
        for key in keys:
            if more_meta.get(key) != meta.get(key):
                raise InferouteError(
                    400, f"{path}: {key} {more_meta.get(key)} differs from {run_jsons[0]}'s {meta.get(key)}"
                )
        seen = {(p.workload, p.contender, p.rate) for p in more}
        points = [p for p in points if (p.workload, p.contender, p.rate) not in seen] + more
        meta["workloads"] = list(dict.fromkeys([*meta["workloads"], *more_meta["workloads"]]))
        meta["contenders"] = list(dict.fromkeys([*meta["contenders"], *more_meta["contenders"]]))
        meta["command"] = f"{meta['command']}; {more_meta['command']}"
    rates = {w: sorted({p.rate for p in points if p.workload == w}) for w in meta["workloads"]}
    cfg = RunConfig(
        workloads=list(meta["workloads"]),
        rates=rates,
        contenders=select_contenders(",".join(meta["contenders"])),
        duration=float(meta["duration_s"]),
        warmup=float(meta["warmup_s"]),
        replicas=int(meta["replicas"]),
        router_replicas=int(meta["router_replicas"]),
        router_sync=bool(meta["router_sync"]),
        time_scale=float(meta["time_scale"]),
        seed=int(meta["seed"]),
        slo_ttft=float(meta.get("slo_ttft_p90_s", SLO_TTFT_P90)),
        kv_cache_blocks=meta.get("kv_cache_blocks"),
        warmup_rate=meta.get("warmup_rate"),
        out_dir=out_dir or run_jsons[0].parent,
        quick=bool(meta["quick"]),
        command=str(meta["command"]),
        started=str(meta["started"]),
    )
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    workloads = {name: get_workload(name, quick=cfg.quick) for name in cfg.workloads}
    order = {c.name: i for i, c in enumerate(cfg.contenders)}
    points.sort(key=lambda p: (cfg.workloads.index(p.workload), order.get(p.contender, 0), p.rate))
    return write_reports(cfg, workloads, points, plots=True)


def _old_run_defaults(meta: dict[str, Any]) -> None:
    """Runs from before ``--router-replicas`` had one instance; before ``router_sync``, no syncing."""
    meta.setdefault("router_replicas", 1)
    meta.setdefault("router_sync", False)


def _parse_rates(values: Sequence[str]) -> list[float]:
    rates: list[float] = []
    for v in values:
        for part in v.split(","):
            if part.strip():
                try:
                    rate = float(part)
                except ValueError:
                    rate = math.nan
                if not math.isfinite(rate) or rate <= 0:
                    raise click.BadParameter(
                        f"rate must be a positive number, got {part!r}", param_hint="'--rates'"
                    )
                rates.append(rate)
    return sorted(set(rates))


@click.command("routing")
@click.option(
    "--workload",
    "workload_names",
    multiple=True,
    type=click.Choice(sorted(WORKLOADS)),
    help="Workload(s) to run (repeatable); default: all (quick: shared-prefix).",
)
@click.option(
    "--rates",
    "rate_values",
    multiple=True,
    help="Offered rates in requests/s (comma-separated or repeated); default: per workload.",
)
@click.option(
    "--duration",
    type=click.FloatRange(0, min_open=True),
    default=None,
    help="Seconds of traffic per point (default 20; quick 4).",
)
@click.option(
    "--warmup",
    type=click.FloatRange(min=0),
    default=None,
    help="Seconds at the start of each point left out of the statistics (default 6; quick 1).",
)
@click.option(
    "--replicas",
    type=click.IntRange(min=1),
    default=None,
    help="Simulated model-server replicas (default 4; quick 2).",
)
@click.option(
    "--router-replicas",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Instances of each contender's router in front of the pool (own ports, own picker state); "
    "requests are spread over them per request, as by a Kubernetes Service (seeded, the same for every "
    "contender).",
)
@click.option(
    "--router-sync/--no-router-sync",
    default=True,
    show_default=True,
    help="With several router replicas: inferoute's instances share in-flight load and prefix placements "
    "through a redis-server started for each point (the peers have no such thing).",
)
@click.option(
    "--time-scale",
    type=click.FloatRange(0, min_open=True),
    default=None,
    help="Multiplies every simulated duration (default 1 = modelled H100 speed; quick 0.2).",
)
@click.option(
    "--contenders",
    default=None,
    help="Comma-separated contenders or prefixes (inferoute, "
    "vllm-router, sglang-router/cache_aware, ...); default: all (quick: three).",
)
@click.option(
    "--warmup-rate",
    type=click.FloatRange(0, min_open=True),
    default=None,
    help="Requests/s offered during the warm-up (default: the point's rate); below the pool's capacity the "
    "cold caches' first misses leave no backlog for the measured window.",
)
@click.option(
    "--kv-cache-blocks",
    type=click.IntRange(1),
    default=None,
    help="KV blocks per simulated replica instead of the workload's sizing (e.g. 27000: every prefix stays "
    "cached, the pool's compute-bound ceiling).",
)
@click.option(
    "--slo-ttft",
    type=click.FloatRange(0, min_open=True),
    default=SLO_TTFT_P90,
    show_default=True,
    help="p90 TTFT bound (seconds at modelled-H100 speed) of the capacity figure; on the wall clock it is "
    "multiplied by --time-scale.",
)
@click.option(
    "--seed", type=int, default=42, show_default=True, help="Seeds the workload and the simulator pool."
)
@click.option(
    "--from-json",
    "from_json",
    multiple=True,
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="Do not run: rebuild summary.md, summary.csv and plots from an earlier run.json; repeated, merge "
    "runs of the same seed (e.g. one rate each) into one report in --out.",
)
@click.option(
    "--quick", is_flag=True, help="Smoke test: small workload, two rates, three contenders (<1 min)."
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    callback=out_dir_check,
    default=Path("bench-results/routing"),
    show_default=True,
    help="Directory for run.json, CSVs, plots and summary.md.",
)
def command(
    workload_names: tuple[str, ...],
    rate_values: tuple[str, ...],
    duration: float | None,
    warmup: float | None,
    replicas: int | None,
    router_replicas: int,
    router_sync: bool,
    time_scale: float | None,
    contenders: str | None,
    warmup_rate: float | None,
    kv_cache_blocks: int | None,
    slo_ttft: float,
    seed: int,
    from_json: tuple[Path, ...],
    quick: bool,
    out_dir: Path,
) -> None:
    """Routing quality: TTFT, ITL, throughput and cache hits of every contender at every rate."""
    if from_json:
        target = out_dir if len(from_json) > 1 else from_json[0].parent
        try:
            rebuild_reports(list(from_json), target)
        except InferouteError as exc:
            raise click.BadParameter(exc.message, param_hint="--from-json") from exc
        click.echo(f"rebuilt {target}/summary.md, summary.csv and plots")
        return
    names = list(workload_names) or (["shared-prefix"] if quick else list(WORKLOADS))
    explicit = _parse_rates(rate_values)
    rates = {w: explicit or list(QUICK_RATES if quick else DEFAULT_RATES[w]) for w in names}
    try:
        default = OVERLOAD_CONTENDERS if names == ["overload"] else (QUICK_CONTENDERS if quick else None)
        chosen = select_contenders(contenders or default)
    except InferouteError as exc:
        raise click.BadParameter(exc.message, param_hint="--contenders") from exc
    cfg = RunConfig(
        workloads=names,
        rates=rates,
        contenders=chosen,
        duration=duration if duration is not None else (4.0 if quick else 20.0),
        warmup=warmup if warmup is not None else (1.0 if quick else 6.0),
        replicas=replicas if replicas is not None else (2 if quick else 4),
        router_replicas=router_replicas,
        router_sync=router_sync,
        time_scale=time_scale if time_scale is not None else (0.2 if quick else 1.0),
        seed=seed,
        slo_ttft=slo_ttft,
        kv_cache_blocks=kv_cache_blocks,
        warmup_rate=warmup_rate,
        out_dir=out_dir,
        quick=quick,
        command="inferoute " + shlex.join(sys.argv[1:]),
    )
    if cfg.warmup >= cfg.duration:
        raise click.BadParameter("warm-up must be shorter than the duration", param_hint="--warmup")
    points = _run_with_progress(cfg)
    failed = sum(1 for p in points if p.ok == 0)
    click.echo(f"wrote {cfg.out_dir}/summary.md, run.json, summary.csv, requests.csv and plots")
    if failed:
        raise click.ClickException(f"{failed} point(s) completed no request; see {cfg.out_dir}/logs")


def _run_with_progress(cfg: RunConfig) -> list[PointSummary]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    total = len(cfg.points())
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        overall = bar.add_task("points", total=total)
        current = bar.add_task("requests", total=1)

        def on_requests(tag: str, done: int, planned: int) -> None:
            bar.update(current, description=tag, completed=done, total=max(planned, 1))

        done: list[PointSummary] = []

        def on_point(p: PointSummary) -> None:
            done.append(p)
            bar.advance(overall)
            console.log(
                f"{p.workload} {p.contender} @ {p.rate:g}/s: p90 TTFT {p.ttft_p90:.3f}s, "
                f"{p.output_tps:.0f} tok/s, hit {p.cache_hit_rate:.0%}, errors {p.error_count}"
            )

        async def main() -> list[PointSummary]:
            # Ctrl-C / SIGTERM cancel the run; run_point's finally blocks stop the simulator and router, and
            # the reports written after each finished point stay.
            loop = asyncio.get_running_loop()
            me = asyncio.current_task()
            assert me is not None
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, me.cancel)
            try:
                return await run_benchmark(cfg, on_requests, on_point)
            except asyncio.CancelledError:
                console.log(f"interrupted after {len(done)} point(s); partial reports in {cfg.out_dir}")
                return done

        return asyncio.run(main())
