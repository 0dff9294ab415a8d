"""``/metrics`` for one replica: a prometheus_client Collector that reads the engine at scrape time.

Names follow vLLM V1 (every series has a ``model_name`` label). Gauges are computed from engine state when
scraped; counters and histograms come from :class:`~inferoute.sim.stats.EngineStats`.

Rendering the ~30 KB page costs ~2 ms of CPU, and a picker scrapes every replica 20 times a second: an idle
demo pool of 4 replicas spent ~16% of a core on it. :class:`MetricsPage` renders again only when something
the page shows changed -- a fingerprint of the engine's gauges, every counter and every histogram's count
(each observation changes one), ~2 µs -- and re-renders only the LoRA info family each time, whose value is
the wall clock (docs/benchmarks.md, "Simulator /metrics").
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from inferoute.sim.engine import Engine
from inferoute.sim.stats import EngineStats, Histogram


class EngineCollector(Collector):
    """Exposes one engine under vLLM's metric names (``lora_info=False``: without the LoRA info family, which
    :class:`LoraInfoCollector` then exposes)."""

    def __init__(
        self, engine: Engine, wall_clock: Callable[[], float] = time.time, *, lora_info: bool = True
    ) -> None:
        self._engine = engine
        self._wall = wall_clock
        self._lora_info = lora_info

    def collect(self) -> Iterator[Metric]:
        e = self._engine
        model = e.config.model
        yield from _gauges(
            model,
            (
                (
                    "vllm:num_requests_running",
                    "Number of requests in model execution batches.",
                    e.num_running,
                ),
                ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", e.num_waiting),
                ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", e.kv_usage),
            ),
        )
        info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            labels=["model_name", "block_size", "num_gpu_blocks", "enable_prefix_caching"],
        )
        info.add_metric([model, str(e.config.block_size), str(e.config.kv_cache_blocks), "True"], 1.0)
        yield info
        if self._lora_info:
            yield from LoraInfoCollector(e, self._wall).collect()
        yield from _stat_counters(model, e.stats)
        yield from _stat_histograms(model, e.stats)


def _gauges(model: str, rows: Iterable[tuple[str, str, float]]) -> Iterator[GaugeMetricFamily]:
    for name, doc, value in rows:
        g = GaugeMetricFamily(name, doc, labels=["model_name"])
        g.add_metric([model], value)
        yield g


def _counters(model: str, rows: Iterable[tuple[str, str, float]]) -> Iterator[CounterMetricFamily]:
    for name, doc, value in rows:
        c = CounterMetricFamily(name, doc, labels=["model_name"])
        c.add_metric([model], value)
        yield c


def _stat_counters(model: str, s: EngineStats) -> Iterator[CounterMetricFamily]:
    """vLLM's token, request and preemption counters, plus the simulator's own (``inferoute_sim:``)."""
    yield from _counters(
        model,
        (
            (
                "vllm:prefix_cache_queries",
                "Prefix cache queries, in terms of number of queried tokens.",
                s.prefix_queries,
            ),
            (
                "vllm:prefix_cache_hits",
                "Prefix cache hits, in terms of number of cached tokens.",
                s.prefix_hits,
            ),
            ("vllm:prompt_tokens", "Number of prefill tokens processed.", s.prompt_tokens),
            ("vllm:generation_tokens", "Number of generation tokens processed.", s.generation_tokens),
        ),
    )
    succ = CounterMetricFamily(
        "vllm:request_success",
        "Count of successfully processed requests.",
        labels=["model_name", "finished_reason"],
    )
    for reason in sorted({"stop", "length", *s.success}):
        if reason != "abort":
            succ.add_metric([model, reason], s.success.get(reason, 0))
    yield succ
    yield from _counters(
        model,
        (
            (
                "inferoute_sim:rejected_queue_full",
                "Requests answered 429 because the queue was full.",
                s.rejected_queue_full,
            ),
            ("vllm:num_preemptions", "Cumulative number of preemptions.", s.preemptions),
            ("inferoute_sim:lora_loads", "Adapters loaded into a LoRA slot.", s.lora_loads),
            (
                "inferoute_sim:lora_slot_waits",
                "Requests that waited because every LoRA slot was busy (each counted once).",
                s.lora_slot_waits,
            ),
            (
                "inferoute_sim:aborted_requests",
                "Requests dropped because the client went away.",
                s.success.get("abort", 0),
            ),
        ),
    )


def _stat_histograms(model: str, s: EngineStats) -> Iterator[HistogramMetricFamily]:
    """vLLM's per-request latency and length histograms."""
    for name, doc, h in (
        ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", s.ttft),
        ("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", s.itl),
        ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", s.e2e),
        ("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", s.queue),
        (
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            s.prefill,
        ),
        (
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            s.decode,
        ),
        (
            "vllm:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.",
            s.inference,
        ),
        (
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            s.tpot,
        ),
        ("vllm:request_prompt_tokens", "Number of prefill tokens processed.", s.prompt_len),
        ("vllm:request_generation_tokens", "Number of generation tokens processed.", s.generation_len),
        (
            "vllm:request_params_max_tokens",
            "Histogram of the max_tokens request parameter.",
            s.max_tokens_param,
        ),
    ):
        m = HistogramMetricFamily(name, doc, labels=["model_name"])
        m.add_metric([model], [(le, float(c)) for le, c in h.cumulative()], h.sum)
        yield m


class LoraInfoCollector(Collector):
    """``vllm:lora_requests_info`` (only with adapters configured): the running and waiting adapters as
    labels, the wall clock as the value -- as vLLM does."""

    def __init__(self, engine: Engine, wall_clock: Callable[[], float] = time.time) -> None:
        self._engine = engine
        self._wall = wall_clock

    def collect(self) -> Iterator[Metric]:
        e = self._engine
        cfg = e.config
        if not cfg.lora_adapters:
            return
        lora = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Running stats on lora requests.",
            labels=["model_name", "max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        lora.add_metric(
            [cfg.model, str(cfg.max_loras), ",".join(e.running_loras), ",".join(e.waiting_loras)],
            self._wall(),
        )
        yield lora


def engine_fingerprint(engine: Engine) -> tuple[object, ...]:
    """Changes whenever anything :class:`EngineCollector` shows changes: the gauges, every counter of
    :class:`EngineStats` and the count of every histogram (counters and counts only grow)."""
    e = engine
    values: list[object] = [e.num_running, e.num_waiting, e.kv_usage, *e.running_loras, "|", *e.waiting_loras]
    stats = e.stats
    for name in _STATS_FIELDS:
        v = getattr(stats, name)
        if isinstance(v, Histogram):
            values.append(v.count)
        elif isinstance(v, dict):
            values.append(tuple(v.items()))
        else:
            values.append(v)
    return tuple(values)


_STATS_FIELDS = tuple(f.name for f in dataclasses.fields(EngineStats))


class MetricsPage:
    """The ``/metrics`` body of one replica, rendered again only when its fingerprint changed (see the
    module docstring). ``cached`` holds every collector but the LoRA info, ``fingerprint`` covers them all;
    the LoRA info family is rendered on every scrape and appended."""

    def __init__(
        self,
        engine: Engine,
        cached: CollectorRegistry,
        fingerprint: Callable[[], object],
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._cached = cached
        self._fingerprint = fingerprint
        self._live: CollectorRegistry | None = None
        if engine.config.lora_adapters:
            self._live = CollectorRegistry(auto_describe=False)
            self._live.register(LoraInfoCollector(engine, wall_clock))
        self._key: object = None
        self._body = b""
        self.renders = 0
        """How many times the cached part was rendered (tests, benchmarks)."""

    def body(self) -> bytes:
        key = self._fingerprint()
        if key != self._key or self.renders == 0:
            self._body = generate_latest(self._cached)
            self._key = key
            self.renders += 1
        if self._live is None:
            return self._body
        return self._body + generate_latest(self._live)


def engine_registry(engine: Engine, wall_clock: Callable[[], float] = time.time) -> CollectorRegistry:
    """A fresh registry holding only ``engine``'s collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine, wall_clock))
    return registry
