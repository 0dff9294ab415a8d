"""``inferoute bench scheduler``: scheduling latency at 10/100/1,000 endpoints, and the cost of scraping.

Part 1 (pure, in process): a :class:`~inferoute.epp.requestcontrol.director.Director` over a datastore
of N endpoints with randomised metrics, driven with small (~1 KB) and large (200 KB) completion prompts
drawn from 8 shared prefixes; we time ``decide`` (parse, candidates, schedule, learn, metrics) per call
and report p50/p99.

Part 1b (pure, in process): the **full pick lifecycle** per request, as a data plane drives an
:class:`~inferoute.epp.assembly.EmbeddedPicker`: ``pick`` (parse, candidates, schedule, learn, metrics),
then the session's ``response_started``, one response chunk carrying the SSE ``usage`` object, and
``response_finished``. Chat requests of ~4 KB (one of 16 shared 3 KB system prompts + a unique question) and
~200 KB (one of 16 shared documents + a unique question) against a prefix index warmed by earlier requests of
the same workload; we report process CPU time per request (``time.process_time`` over batches, best batch).

Part 2 (real sockets): a child process serves a realistic vLLM ``/metrics`` page on 100 ports — the same
page every time (idle server), a page whose values change on every scrape (busy server), or the filtered
page; the picker's collector scrapes all 100 every 50 ms (20 Hz) for a few seconds, and we report the
collector process's CPU time as a fraction of one core, plus the parse cost of one page.
"""

from __future__ import annotations

import asyncio
import atexit
import importlib
import json
import multiprocessing
import random
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import click
from prometheus_client import CollectorRegistry

from inferoute.cliparams import out_file
from inferoute.clock import FakeClock, SystemClock
from inferoute.endpoints import Endpoint
from inferoute.epp.assembly import EmbeddedPicker, EppOptions
from inferoute.epp.config import BUILTIN_PROFILES, PickerConfig, builtin_profile_text, parse_config
from inferoute.epp.datalayer.collector import MetricsCollector
from inferoute.epp.datalayer.datastore import Datastore
from inferoute.epp.datalayer.metrics import ENGINES, EndpointMetrics, ParseCache, parse_metrics
from inferoute.epp.datalayer.sources import StaticSource
from inferoute.epp.learned import LocalLearnedState
from inferoute.epp.metrics import EppMetrics
from inferoute.epp.plugin import PluginDeps
from inferoute.epp.requestcontrol.director import Director
from inferoute.picking import Decision, Destination, PickRequest, PickSession
from inferoute.sim.stats import TOKEN_COUNT_BUCKETS, TTFT_BUCKETS

# -- part 1: scheduling latency ---------------------------------------------------------------------------


@dataclass
class Rig:
    """A picker's parts over ``n`` endpoints with random (but fixed) metrics, on a fake clock."""

    clock: FakeClock
    metrics: EppMetrics
    learned: LocalLearnedState
    config: PickerConfig
    datastore: Datastore
    endpoints: list[Endpoint]

    @classmethod
    def build(cls, n: int, profile: str, seed: int = 1, registry: CollectorRegistry | None = None) -> Rig:
        clock = FakeClock(10.0)
        metrics = EppMetrics(registry or CollectorRegistry())
        learned = LocalLearnedState()
        cfg = parse_config(
            builtin_profile_text(profile),
            deps=PluginDeps(learned, clock, seed),
            observer=metrics.plugin_observer,
        )
        ds = Datastore(clock)
        eps = [Endpoint(f"pod-{i}", f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}", 8000) for i in range(n)]
        ds.set_endpoints(eps)
        rng = random.Random(seed)
        for e in eps:
            ds.record_scrape(
                e.key,
                EndpointMetrics(
                    waiting=rng.randint(0, 10),
                    running=rng.randint(0, 64),
                    kv_usage=rng.random(),
                    block_size=16,
                    num_gpu_blocks=27000,
                ),
            )
        return cls(clock, metrics, learned, cfg, ds, eps)


def build_director(n: int, profile: str, seed: int = 1) -> Director:
    """A director over ``n`` endpoints with random (but fixed) metrics, on a fake clock."""
    r = Rig.build(n, profile, seed)
    return Director(
        r.datastore,
        r.config.scheduler,
        r.learned,
        r.metrics,
        r.clock,
        prefix=r.config.prefix,
        saturation=r.config.saturation,
        rng=random.Random(seed),
    )


def prompts(size: int, count: int = 64, prefixes: int = 8) -> list[bytes]:
    """Completion bodies of ~``size`` bytes sharing one of ``prefixes`` system prompts."""
    out = []
    for i in range(count):
        head = f"System prompt number {i % prefixes}: be precise and cite sources. "
        text = (head * (size // len(head) + 1))[: size - 40] + f" question {i}"
        out.append(json.dumps({"model": "meta-llama/Llama-3.1-8B-Instruct", "prompt": text}).encode())
    return out


@dataclass
class LatencyRow:
    profile: str
    endpoints: int
    prompt_bytes: int
    picks: int
    p50_us: float
    p99_us: float
    mean_us: float
    cpu_p50_us: float
    """CPU time of the picking thread per decision: what a busy machine's preemptions do not inflate."""
    cpu_p99_us: float


def measure_latency(n: int, profile: str, size: int, picks: int) -> LatencyRow:
    director = build_director(n, profile)
    bodies = prompts(size)
    reqs = [PickRequest("POST", "/v1/completions", {}, b) for b in bodies]
    for r in reqs:  # warm up: learn every prefix once
        d, s = director.decide(r)
        assert isinstance(d, Destination)
        s.response_finished()
    lat: list[float] = []
    cpu: list[float] = []
    perf = time.perf_counter
    thread_time = time.thread_time
    for i in range(picks):
        r = reqs[i % len(reqs)]
        c0 = thread_time()
        t0 = perf()
        _, s = director.decide(r)
        t1 = perf()
        cpu.append(thread_time() - c0)
        lat.append(t1 - t0)
        s.response_finished()
    lat.sort()
    cpu.sort()

    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, int(len(xs) * q))] * 1e6

    return LatencyRow(
        profile,
        n,
        len(bodies[0]),
        picks,
        pct(lat, 0.5),
        pct(lat, 0.99),
        statistics.fmean(lat) * 1e6,
        pct(cpu, 0.5),
        pct(cpu, 0.99),
    )


# -- part 1b: the full pick lifecycle ---------------------------------------------------------------------

LIFECYCLE_MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def build_picker(n: int, profile: str, seed: int = 1) -> EmbeddedPicker:
    """An :class:`EmbeddedPicker` (not started: no scraping) over ``n`` endpoints with random (but fixed)
    metrics, on a fake clock: the object a gateway or the ext_proc server calls ``pick`` on."""
    opts = EppOptions(profile=profile, seed=seed)
    r = Rig.build(n, profile, seed, opts.registry)
    opts.clock = r.clock
    return EmbeddedPicker(opts, r.config, StaticSource(r.endpoints), r.datastore, r.learned, r.metrics)


def chat_bodies(size: int, count: int, start: int = 0, shared: int = 16) -> list[bytes]:
    """Streaming chat bodies of ~``size`` bytes: one of ``shared`` system prompts (3/4 of a 4 KB body, all
    but ~600 bytes of a large one) and a unique user question (request number ``start + i``). Popularity is
    skewed as in real traffic: request ``i`` uses system prompt ``min(shared - 1, E)`` with ``E`` exponential
    of mean ``shared / 4`` (seeded by ``i``), so a few prompts are hot and the tail churns the LRUs."""
    system_len = size * 3 // 4 if size < 16_000 else size - 600
    out = []
    for i in range(start, start + count):
        k = min(shared - 1, int(random.Random(i).expovariate(4 / shared)))
        head = f"System prompt {k}: you answer questions about document {k}, precisely, with sources. "
        system = (head * (system_len // len(head) + 1))[:system_len]
        q = f"Question {i}: what does section {i % 97} say about item {i * 7919 % 10007}? "
        user = (q * ((size - system_len - 250) // len(q) + 1))[: max(20, size - system_len - 250)]
        body = {
            "model": LIFECYCLE_MODEL,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": 256,
            "temperature": 0.7,
        }
        out.append(json.dumps(body).encode())
    return out


def usage_chunk(prompt_tokens: int) -> bytes:
    """The last SSE chunk of a streamed chat completion with ``include_usage``, then ``[DONE]``."""
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 256,
        "total_tokens": prompt_tokens + 256,
        "prompt_tokens_details": {"cached_tokens": prompt_tokens // 2},
    }
    event = {
        "id": "chatcmpl-0123456789abcdef",
        "object": "chat.completion.chunk",
        "created": 1763850000,
        "model": LIFECYCLE_MODEL,
        "choices": [],
        "usage": usage,
    }
    return b"data: " + json.dumps(event).encode() + b"\n\ndata: [DONE]\n\n"


_RESPONSE_HEADERS = {"content-type": "text/event-stream", "x-inference-pod": "pod-0"}


def run_pick(picker: EmbeddedPicker, request: PickRequest) -> tuple[Decision, PickSession]:
    """``await picker.pick(request)`` without an event loop (the embedded picker never suspends)."""
    coro = picker.pick(request)
    try:
        coro.send(None)
    except StopIteration as done:
        result: tuple[Decision, PickSession] = done.value
        return result
    coro.close()
    raise RuntimeError("EmbeddedPicker.pick suspended")


def lifecycle(picker: EmbeddedPicker, request: PickRequest, chunk: bytes) -> str:
    """One request's picker work, as a data plane drives it; returns the primary endpoint."""
    decision, session = run_pick(picker, request)
    assert isinstance(decision, Destination)
    served = decision.endpoints[0]
    session.response_started(served, 200, _RESPONSE_HEADERS)
    session.response_chunk(chunk)
    session.response_finished()
    return served


@dataclass
class LifecycleRow:
    profile: str
    endpoints: int
    prompt_bytes: int
    warm_requests: int
    requests: int
    """Timed requests per batch."""
    batches: int
    cpu_us: float
    """Process CPU per request, best batch."""
    cpu_us_median: float
    """Median over batches."""
    prefix_blocks: int
    """Distinct blocks in the prefix index after the run."""


def measure_lifecycle(
    n: int, profile: str, size: int, requests: int, *, batches: int = 5, warm: int | None = None
) -> LifecycleRow:
    """CPU per request of the full lifecycle (see module docstring), best of ``batches`` batches of
    ``requests`` unique requests after ``warm`` earlier ones of the same workload."""
    picker = build_picker(n, profile)
    warm = warm if warm is not None else max(4 * n, 4 * requests)
    chunk = usage_chunk(size // 4)
    number = 0
    for i in range(0, warm, 256):
        for body in chat_bodies(size, min(256, warm - i), number):
            lifecycle(picker, PickRequest("POST", "/v1/chat/completions", {}, body), chunk)
        number += min(256, warm - i)
    per_batch: list[float] = []
    clock = time.process_time
    for _ in range(batches):
        reqs = [
            PickRequest("POST", "/v1/chat/completions", {}, b) for b in chat_bodies(size, requests, number)
        ]
        number += requests
        c0 = clock()
        for r in reqs:
            lifecycle(picker, r, chunk)
        per_batch.append((clock() - c0) / requests * 1e6)
        del reqs
    return LifecycleRow(
        profile,
        n,
        len(chat_bodies(size, 1)[0]),
        warm,
        requests,
        batches,
        min(per_batch),
        statistics.median(per_batch),
        picker.learned.snapshot().size(),
    )


def import_tree(src: Path, name: str = "inferoute_before") -> ModuleType:
    """The ``bench.scheduler`` module of the ``inferoute`` package in ``src`` (another checkout's ``src/``,
    e.g. ``git archive REV src | tar -x -C DIR``), imported as package ``name`` with its own absolute imports
    rewritten: two versions of the picker in one process. The tree must have the lifecycle helpers."""
    root = Path(tempfile.mkdtemp(prefix="inferoute-compare-"))
    atexit.register(shutil.rmtree, root, True)  # modules import lazily: keep the copy while we run
    shutil.copytree(src / "inferoute", root / name)
    rename = re.compile(r"\binferoute(?=\.|\s+import\b)")
    for path in (root / name).rglob("*.py"):
        path.write_text(rename.sub(name, path.read_text()))
    sys.path.insert(0, str(root))
    return importlib.import_module(f"{name}.bench.scheduler")


@dataclass
class CompareRow:
    profile: str
    endpoints: int
    prompt_bytes: int
    rounds: int
    other_us: float
    """The other tree: lower quartile of its batches, CPU µs per request."""
    other_median_us: float
    this_us: float
    this_median_us: float


def compare_lifecycle(
    other: ModuleType,
    n: int,
    profile: str,
    size: int,
    rounds: int = 20,
    *,
    batch: int | None = None,
    warm: int | None = None,
) -> CompareRow:
    """The lifecycle of :func:`measure_lifecycle` on this tree and on ``other`` (see :func:`import_tree`),
    batches alternating between the two pickers in one process, so both see the same machine load; the
    figures are the lower quartile (and the median) of the batches."""
    batch = batch or (100 if size < 100_000 else 20)
    warm = warm if warm is not None else max(4 * n, 400 if size < 100_000 else 80)
    sides: list[tuple[Any, Any, Any, bytes, list[float]]] = []
    for mod in (other, sys.modules[__name__]):
        picker = mod.build_picker(n, profile)
        chunk = mod.usage_chunk(size // 4)
        request = importlib.import_module(mod.__name__.split(".")[0] + ".picking").PickRequest
        for body in mod.chat_bodies(size, warm, 0):
            mod.lifecycle(picker, request("POST", "/v1/chat/completions", {}, body), chunk)
        sides.append((mod, picker, request, chunk, []))
    number = warm
    for r in range(rounds):
        for mod, picker, request, chunk, times in sides if r % 2 else sides[::-1]:
            reqs = [
                request("POST", "/v1/chat/completions", {}, b) for b in mod.chat_bodies(size, batch, number)
            ]
            c0 = time.process_time()
            for q in reqs:
                mod.lifecycle(picker, q, chunk)
            times.append((time.process_time() - c0) / batch * 1e6)
        number += batch

    def quartile(xs: list[float]) -> float:
        return sorted(xs)[len(xs) // 4]

    theirs, ours = sides[0][4], sides[1][4]
    return CompareRow(
        profile,
        n,
        size,
        rounds,
        quartile(theirs),
        statistics.median(theirs),
        quartile(ours),
        statistics.median(ours),
    )


def _compare_table(rows: Sequence[CompareRow]) -> str:
    return _markdown(
        ("profile", "endpoints", "prompt", "other tree: CPU per request", "this tree", "change"),
        (
            (
                r.profile,
                str(r.endpoints),
                f"{r.prompt_bytes / 1000:.0f} KB",
                f"{r.other_us:.0f} µs ({r.other_median_us:.0f})",
                f"{r.this_us:.0f} µs ({r.this_median_us:.0f})",
                f"{(r.this_us - r.other_us) / r.other_us:+.0%}",
            )
            for r in rows
        ),
    )


def _markdown(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A Markdown table: the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def _lifecycle_table(rows: Sequence[LifecycleRow]) -> str:
    return _markdown(
        ("profile", "endpoints", "prompt", "CPU per request (best batch)", "median batch", "index blocks"),
        (
            (
                r.profile,
                str(r.endpoints),
                f"{r.prompt_bytes / 1000:.0f} KB",
                f"{r.cpu_us:.0f} µs",
                f"{r.cpu_us_median:.0f} µs",
                f"{r.prefix_blocks:,}",
            )
            for r in rows
        ),
    )


# -- part 2: scrape cost ------------------------------------------------------------------------------------


def vllm_metrics_page(model: str = "meta-llama/Llama-3.1-8B-Instruct") -> bytes:
    """A page shaped like vLLM v1's ``/metrics`` for one model: process/python series, the gauges, the info
    series, counters and the request histograms with vLLM's bucket layouts (~50 KB)."""
    lab = f'engine="0",model_name="{model}"'
    lines: list[str] = []
    for g in range(3):
        lines += [
            f'python_gc_objects_collected_total{{generation="{g}"}} {1000 * g}.0',
            f'python_gc_collections_total{{generation="{g}"}} {10 * g}.0',
        ]
    for name in (
        "process_virtual_memory_bytes",
        "process_resident_memory_bytes",
        "process_start_time_seconds",
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_max_fds",
    ):
        lines += [f"# TYPE {name} gauge", f"{name} 1.23e+09"]
    gauges = {
        "vllm:num_requests_running": 12,
        "vllm:num_requests_waiting": 3,
        "vllm:kv_cache_usage_perc": 0.37,
    }
    for name, v in gauges.items():
        lines += [f"# HELP {name} x", f"# TYPE {name} gauge", f"{name}{{{lab}}} {v}"]
    lines.append(
        f'vllm:cache_config_info{{block_size="16",cache_dtype="auto",enable_prefix_caching="True",'
        f'gpu_memory_utilization="0.9",num_gpu_blocks="27000",{lab}}} 1.0'
    )
    lines.append(
        'vllm:lora_requests_info{max_lora="2",running_lora_adapters="sql",waiting_lora_adapters=""} 1.7e9'
    )
    for name in (
        "prompt_tokens",
        "generation_tokens",
        "num_preemptions",
        "prefix_cache_queries",
        "prefix_cache_hits",
    ):
        lines += [f"# TYPE vllm:{name}_total counter", f"vllm:{name}_total{{{lab}}} 123456.0"]
    for reason in ("stop", "length", "abort"):
        lines.append(f'vllm:request_success_total{{finished_reason="{reason}",{lab}}} 99.0')
    # vLLM's own bucket boundaries, as the simulator exports them.
    latency: list[float] = list(TTFT_BUCKETS)
    tokens: list[float] = list(TOKEN_COUNT_BUCKETS)
    hists: dict[str, list[float]] = {
        "time_to_first_token_seconds": latency,
        "inter_token_latency_seconds": latency,
        "request_time_per_output_token_seconds": latency,
        "e2e_request_latency_seconds": latency,
        "request_queue_time_seconds": latency,
        "request_inference_time_seconds": latency,
        "request_prefill_time_seconds": latency,
        "request_decode_time_seconds": latency,
        "request_prompt_tokens": tokens,
        "request_generation_tokens": tokens,
        "request_params_max_tokens": tokens,
        "request_params_n": [1, 2, 5, 10, 20],
        "iteration_tokens_total": tokens,
    }
    for name, buckets in hists.items():
        lines += [f"# HELP vllm:{name} x", f"# TYPE vllm:{name} histogram"]
        for i, le in enumerate(buckets):
            lines.append(f'vllm:{name}_bucket{{le="{le}",{lab}}} {i * 17}.0')
        lines += [
            f'vllm:{name}_bucket{{le="+Inf",{lab}}} 9999.0',
            f"vllm:{name}_count{{{lab}}} 9999.0",
            f"vllm:{name}_sum{{{lab}}} 12345.678",
        ]
    return ("\n".join(lines) + "\n").encode()


def filtered_page(page: bytes) -> bytes:
    """Only the families the picker reads: what ``/metrics?name[]=...`` returns from vLLM (prometheus_client
    endpoints honour ``name[]`` filters)."""
    keep = (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:lora_requests_info",
        "vllm:cache_config_info",
    )
    lines = [ln for ln in page.split(b"\n") if ln.split(b"{")[0].split(b" ")[0].decode() in keep]
    return b"\n".join(lines) + b"\n"


PAGE_KINDS = ("full", "busy", "filtered")
"""``full``: vLLM's whole page, the same bytes every time (an idle server); ``busy``: the whole page with the
gauges, a counter and the process CPU time changing on every scrape (a loaded server: every page is parsed);
``filtered``: only the families the picker reads (``/metrics?name[]=...``), unchanging."""


def busy_page(page: bytes, i: int) -> bytes:
    """The ``i``-th page of a busy server: running, waiting, KV usage and two counters differ every time."""
    return (
        page.replace(b"} 12\n", b"} %d\n" % (i % 50), 1)
        .replace(b"} 3\n", b"} %d\n" % (i % 7), 1)
        .replace(b"} 0.37\n", b"} 0.%02d\n" % (i % 100), 1)
        .replace(
            b"process_cpu_seconds_total 1.23e+09", b"process_cpu_seconds_total %d.%d" % (i // 10, i % 10), 1
        )
        .replace(b"vllm:prompt_tokens_total{", b'vllm:prompt_tokens_total{n="%d",' % i, 1)
    )


def _serve_metrics(n: int, queue: Any, kind: str = "full") -> None:  # child process
    from aiohttp import web

    full = vllm_metrics_page()
    body = filtered_page(full) if kind == "filtered" else full
    served = [0]

    async def main() -> None:
        async def handler(request: web.Request) -> web.Response:
            if kind == "busy":
                served[0] += 1
                return web.Response(body=busy_page(full, served[0]), content_type="text/plain")
            return web.Response(body=body, content_type="text/plain")

        app = web.Application()
        app.router.add_get("/metrics", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        ports = []
        for _ in range(n):
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            ports.append(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        queue.put(ports)
        await asyncio.Event().wait()

    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


@dataclass
class ScrapeRow:
    page: str
    """One of :data:`PAGE_KINDS`."""
    endpoints: int
    interval_s: float
    seconds: float
    scrapes: int
    errors: int
    cpu_fraction_of_one_core: float
    user_fraction: float
    """Python and event-loop work (user time)."""
    system_fraction: float
    """Kernel time: loopback TCP send/receive and epoll, paid by any implementation."""
    cpu_us_per_scrape: float
    page_bytes: int
    parse_us_per_page: float
    parse_us_per_page_cold: float


def measure_parse(page: bytes, rounds: int = 2000, *, cached: bool = True) -> float:
    """Microseconds to parse one page, as the collector does (with a per-endpoint ParseCache: 20 Hz scrapes,
    the static cache-config family re-read every 10 s) or cold (every family searched every time)."""
    engine = ENGINES["vllm"]
    cache = ParseCache() if cached else None
    t0 = time.perf_counter()
    for i in range(rounds):
        parse_metrics(page, engine, i * 0.05, cache)
    return (time.perf_counter() - t0) / rounds * 1e6


async def measure_scrape(n: int, interval: float, seconds: float, kind: str = "full") -> ScrapeRow:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_serve_metrics, args=(n, queue, kind), daemon=True)
    proc.start()
    try:
        ports: list[int] = await asyncio.get_running_loop().run_in_executor(None, queue.get, True, 30)
        ds = Datastore(SystemClock())
        ds.set_endpoints([Endpoint(f"pod-{i}", "127.0.0.1", p) for i, p in enumerate(ports)])
        counts = {"ok": 0, "err": 0}

        def hook(key: str, ok: bool, s: float) -> None:
            counts["ok" if ok else "err"] += 1

        collector = MetricsCollector(ds, interval=interval, timeout=1.0, on_scrape=hook)
        await collector.start()
        try:
            await asyncio.sleep(1.0)  # connect and settle
            c0 = dict(counts)
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            await asyncio.sleep(seconds)
            r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
            user, system = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
            cpu = user + system
            scrapes = counts["ok"] - c0["ok"]
            errors = counts["err"] - c0["err"]
        finally:
            await collector.aclose()
    finally:
        proc.terminate()
        proc.join(5)
    page = filtered_page(vllm_metrics_page()) if kind == "filtered" else vllm_metrics_page()
    return ScrapeRow(
        kind,
        n,
        interval,
        wall,
        scrapes,
        errors,
        cpu / wall,
        user / wall,
        system / wall,
        cpu / max(1, scrapes) * 1e6,
        len(page),
        measure_parse(page),
        measure_parse(page, cached=False),
    )


def calibration_ms() -> float:
    """Milliseconds for a 1M-iteration Python loop (best of 3): how busy/fast the machine was."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        x = 0
        for i in range(1_000_000):
            x += i
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


# -- command ------------------------------------------------------------------------------------------------


def _table(rows: Sequence[LatencyRow]) -> str:
    out = [
        "| profile | endpoints | prompt | wall p50 | wall p99 | CPU p50 | CPU p99 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r.profile} | {r.endpoints} | {r.prompt_bytes / 1000:.0f} KB | {r.p50_us:.0f} µs | "
            f"{r.p99_us:.0f} µs | {r.cpu_p50_us:.0f} µs | {r.cpu_p99_us:.0f} µs |"
        )
    return "\n".join(out)


_Row = TypeVar("_Row")


def _grid(
    profiles: str,
    sizes: str,
    cells: Sequence[tuple[int, int]],
    measure: Callable[[int, str, int, int], _Row],
    describe: Callable[[_Row], str],
) -> list[_Row]:
    """``measure(n, profile, prompt_bytes, count)`` for every profile x pool size x (prompt, count) cell."""
    rows: list[_Row] = []
    for profile in profiles.split(",") if profiles.strip() else ():
        for n in (int(s) for s in sizes.split(",")):
            for size, k in cells:
                rows.append(measure(n, profile, size, k))
                click.echo(f"{profile:15s} n={n:5d} prompt={size:7d}B {describe(rows[-1])}")
    return rows


def _profiles(value: str) -> str:
    """Comma-separated built-in profile names."""
    unknown = [p for p in value.split(",") if p.strip() and p.strip() not in BUILTIN_PROFILES]
    if unknown:
        raise click.BadParameter(f"unknown profile {unknown[0]!r}; valid: {', '.join(BUILTIN_PROFILES)}")
    return value


def _sizes(value: str) -> str:
    """A comma-separated list of endpoint counts (each >= 1), or empty."""
    parts = [p.strip() for p in value.split(",") if p.strip()]
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise click.BadParameter(f"expected comma-separated endpoint counts such as 10,100, got {value!r}")
    return ",".join(parts)


@click.command()
@click.option(
    "--endpoints",
    "sizes",
    default="10,100,1000",
    show_default=True,
    callback=lambda _c, _p, v: _sizes(v),
    help="Pool sizes to time, comma-separated endpoint counts.",
)
@click.option(
    "--profiles",
    default="gie-default,predicted-ttft",
    show_default=True,
    callback=lambda _c, _p, v: _profiles(v),
    help="Comma-separated built-in picker profiles to time.",
)
@click.option(
    "--picks",
    default=3000,
    show_default=True,
    type=click.IntRange(min=1),
    help="Timed picks per small-prompt cell.",
)
@click.option(
    "--scrape-endpoints",
    default=100,
    show_default=True,
    type=click.IntRange(min=0),
    help="0 skips the scrape measurement.",
)
@click.option(
    "--scrape-seconds",
    default=5.0,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Length of the scrape-cost measurement.",
)
@click.option(
    "--scrape-interval",
    default=0.05,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Seconds between scrapes of one endpoint.",
)
@click.option(
    "--lifecycle-endpoints",
    default="3,10,100",
    show_default=True,
    callback=lambda _c, _p, v: _sizes(v),
    help="Pool sizes of the full-lifecycle CPU table (empty: skip it).",
)
@click.option(
    "--lifecycle-requests",
    default=1000,
    show_default=True,
    type=click.IntRange(min=1),
    help="Requests per batch (4 KB; 200 KB: /10).",
)
@click.option("--latency/--no-latency", default=True, show_default=True, help="The decision latency table.")
@click.option(
    "--compare-with",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    default=None,
    help="Another checkout's src/ (from the lifecycle benchmark on): its lifecycle against this tree's, "
    "interleaved in one process.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    callback=out_file,
    help="Write results as JSON here.",
)
def command(
    sizes: str,
    profiles: str,
    picks: int,
    scrape_endpoints: int,
    scrape_seconds: float,
    scrape_interval: float,
    lifecycle_endpoints: str,
    lifecycle_requests: int,
    latency: bool,
    compare_with: Path | None,
    out: Path | None,
) -> None:
    """Scheduling latency p50/p99 at 10/100/1,000 endpoints, CPU per request of the full pick lifecycle at
    3/10/100 endpoints, and scrape CPU for 100 endpoints at 20 Hz."""
    calib = calibration_ms()
    click.echo(f"calibration: 1M-iteration Python loop {calib:.0f} ms (lower = a quieter machine)")
    result: dict[str, Any] = {"calibration_loop_ms": calib}
    rows = _grid(
        profiles if latency else "",
        sizes,
        ((1000, picks), (200_000, max(200, picks // 10))),
        measure_latency,
        lambda r: f"p50={r.p50_us:8.0f}µs p99={r.p99_us:8.0f}µs",
    )
    if rows:
        click.echo(_table(rows))
        result["latency"] = [asdict(r) for r in rows]
    life = _grid(
        profiles if lifecycle_endpoints.strip() else "",
        lifecycle_endpoints,
        ((4096, lifecycle_requests), (200_000, max(20, lifecycle_requests // 10))),
        measure_lifecycle,
        lambda r: f"lifecycle CPU {r.cpu_us:7.1f} µs/request (median batch {r.cpu_us_median:.1f})",
    )
    if life:
        click.echo(_lifecycle_table(life))
        result["lifecycle"] = [asdict(r) for r in life]
    if compare_with is not None:
        other = import_tree(compare_with)
        compared = _grid(
            profiles,
            lifecycle_endpoints,
            ((4096, 20), (200_000, 20)),
            lambda n, profile, size, rounds: compare_lifecycle(other, n, profile, size, rounds),
            lambda r: f"other {r.other_us:7.1f} µs, this {r.this_us:7.1f} µs per request",
        )
        click.echo(_compare_table(compared))
        result["compare"] = [asdict(r) for r in compared]
    if scrape_endpoints:
        import uvloop  # as in production (the gateway and `inferoute epp` run on uvloop)

        scrapes = []
        for kind in PAGE_KINDS:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                scrape = runner.run(measure_scrape(scrape_endpoints, scrape_interval, scrape_seconds, kind))
            scrapes.append(scrape)
            click.echo(
                f"scrape ({scrape.page} page, {scrape.page_bytes} B): {scrape.endpoints} endpoints @ "
                f"{1 / scrape.interval_s:.0f} Hz: {scrape.scrapes} scrapes in {scrape.seconds:.1f}s "
                f"({scrape.errors} errors), CPU {scrape.cpu_fraction_of_one_core:.1%} of one core (user "
                f"{scrape.user_fraction:.1%}, system {scrape.system_fraction:.1%}), "
                f"{scrape.cpu_us_per_scrape:.0f} µs/scrape; parse {scrape.parse_us_per_page:.1f} µs/page "
                f"({scrape.parse_us_per_page_cold:.1f} µs cold)"
            )
        result["scrape"] = [asdict(s) for s in scrapes]
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
