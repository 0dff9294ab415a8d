"""The picker's Prometheus metrics, with GIE's names (``pkg/epp/metrics/metrics.go``), on a given registry.

Pool gauges (``inference_pool_*``) are computed when the registry is collected, from the datastore, so the
scrape loop and the pick path pay nothing for them.

Every series a pick or a response updates (about twenty per request: plugin timings, scheduler latency,
prefix hit ratio, request count, in-flight gauge, TTFT, duration, token histograms) is a
:class:`~inferoute.fastmetrics.FastFamily`: plain Python numbers, children resolved once per label set,
exported by one collector when the registry is collected. ``prometheus_client``'s ``observe`` takes a lock
and checks its arguments (~1.7 µs here against ~0.3 µs); the exposition (names, labels, buckets) is the
same, without the ``_created`` series. Updates are not locked: the picker updates them from its one
event-loop thread, and a collection from another thread reads at worst a sum and a count one observation
apart. Rare events (errors, rewrites, aborts) stay on ``prometheus_client``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from inferoute.epp.datalayer.datastore import Datastore
from inferoute.fastmetrics import DescribedFastCollector, FastFamily

_LATENCY = (0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0)
_PLUGIN = (0.00001, 0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05)
_REQ_DURATION = (0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 2.5, 5, 10, 20, 40, 60, 120, 300, 600)
_TOKENS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


MAX_LABEL_CHARS = 128
"""Longest client-supplied label value (a model name) exported as itself; longer ones become ``other``."""
OTHER = "other"


def bounded_labels(
    known: Mapping[tuple[str, str], object], cap: int, model: str, target: str
) -> tuple[str, str]:
    """The labels for a client-supplied (model, target) pair, bounded in length and count: the pair itself
    when it is already ``known`` or there is room (fewer than ``cap`` known) and both names are at most
    :data:`MAX_LABEL_CHARS` long; otherwise ``(OTHER, OTHER)``. Pure: one rule for every labelled series
    (the hot-path children in :meth:`EppMetrics.series` and the rare prometheus-client counters)."""
    if (model, target) in known:
        return model, target
    if len(known) >= cap or len(model) > MAX_LABEL_CHARS or len(target) > MAX_LABEL_CHARS:
        return OTHER, OTHER
    return model, target


class _PoolCollector(Collector):
    def __init__(self, datastore: Datastore, pool: str, metrics: EppMetrics) -> None:
        self.datastore = datastore
        self.pool = pool
        self.metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        scrapes = CounterMetricFamily(
            "inferoute_epp_scrapes", "Metrics scrapes of model servers by outcome.", labels=["outcome"]
        )
        for outcome, count in self.metrics.scrape_counts.items():
            scrapes.add_metric([outcome], count)
        yield scrapes
        yield CounterMetricFamily(
            "inferoute_epp_scrape_seconds",
            "Time spent in scrapes (sum over endpoints).",
            value=self.metrics.scrape_seconds,
        )
        fresh = self.datastore.fresh_states()
        n = len(fresh)
        ready = GaugeMetricFamily(
            "inference_pool_ready_pods", "Endpoints with fresh metrics.", labels=["name"]
        )
        ready.add_metric([self.pool], n)
        queue = GaugeMetricFamily(
            "inference_pool_average_queue_size", "Mean queued requests per endpoint.", labels=["name"]
        )
        kv = GaugeMetricFamily(
            "inference_pool_average_kv_cache_utilization", "Mean KV-cache utilisation.", labels=["name"]
        )
        running = GaugeMetricFamily(
            "inference_pool_average_running_requests", "Mean running requests.", labels=["name"]
        )
        per_pod = GaugeMetricFamily(
            "inference_pool_per_pod_queue_size",
            "Queued requests per endpoint.",
            labels=["name", "model_server_pod"],
        )
        queue.add_metric([self.pool], sum(s.metrics.waiting for s in fresh) / n if n else 0.0)
        kv.add_metric([self.pool], sum(s.metrics.kv_usage for s in fresh) / n if n else 0.0)
        running.add_metric([self.pool], sum(s.metrics.running for s in fresh) / n if n else 0.0)
        for s in fresh:
            per_pod.add_metric([self.pool, s.endpoint.name], s.metrics.waiting)
        yield from (ready, queue, kv, running, per_pod)


class ModelSeries:
    """The per-(model, target model) children, resolved once (``labels()`` is not free on the hot path)."""

    __slots__ = (
        "cached_tokens",
        "duration",
        "input_tokens",
        "output_tokens",
        "request_total",
        "running",
        "ttft",
    )

    def __init__(self, m: EppMetrics, model: str, target: str) -> None:
        self.request_total = m.request_total.value(model, target)
        self.duration = m.request_duration.histogram(model, target)
        self.ttft = m.request_ttft.histogram(model, target)
        self.input_tokens = m.input_tokens.histogram(model, target)
        self.output_tokens = m.output_tokens.histogram(model, target)
        self.cached_tokens = m.cached_tokens.histogram(model, target)
        self.running = m.running_requests.value(model)


class EppMetrics:
    """All picker metrics; one instance per picker, registered on the registry it is given."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._hot = DescribedFastCollector([*self._objective_families(), *self._scheduler_families()])
        registry.register(self._hot)
        self._rare_counters(registry)
        # Scrapes happen ~2,000 times a second at 100 endpoints: plain ints, exported at collection time.
        self.scrape_counts = {"ok": 0, "error": 0}
        self.scrape_seconds = 0.0
        self._pool: _PoolCollector | None = None
        self._watched: list[Collector] = []
        self._series: dict[tuple[str, str], ModelSeries] = {}
        self.attempt_success = self.scheduler_attempts.value("success")
        self.attempt_failure = self.scheduler_attempts.value("failure")

    def _objective_families(self) -> list[FastFamily]:
        """The per-request series labelled by (model, target model): GIE's ``inference_objective_*``."""
        mt = ("model_name", "target_model_name")
        self.request_total = FastFamily(
            "counter", "inference_objective_request_total", "Requests scheduled (or rejected) per model.", mt
        )
        self.request_duration = FastFamily(
            "histogram",
            "inference_objective_request_duration_seconds",
            "Pick to end of response.",
            mt,
            _REQ_DURATION,
        )
        self.request_ttft = FastFamily(
            "histogram",
            "inference_objective_request_ttft_seconds",
            "Pick to first response byte.",
            mt,
            _REQ_DURATION,
        )
        self.input_tokens = FastFamily(
            "histogram",
            "inference_objective_input_tokens",
            "Prompt tokens (from response usage).",
            mt,
            _TOKENS,
        )
        self.output_tokens = FastFamily(
            "histogram",
            "inference_objective_output_tokens",
            "Completion tokens (from response usage).",
            mt,
            _TOKENS,
        )
        self.cached_tokens = FastFamily(
            "histogram",
            "inference_objective_prompt_cached_tokens",
            "Cached prompt tokens (from response usage).",
            mt,
            _TOKENS,
        )
        self.running_requests = FastFamily(
            "gauge",
            "inference_objective_running_requests",
            "Requests picked and not finished.",
            ["model_name"],
        )
        return [
            self.request_total,
            self.request_duration,
            self.request_ttft,
            self.input_tokens,
            self.output_tokens,
            self.cached_tokens,
            self.running_requests,
        ]

    def _scheduler_families(self) -> list[FastFamily]:
        """The scheduler's and the prefix index's series (``inference_extension_*``); the unlabelled ones
        are kept as their single child."""
        scheduler_e2e = FastFamily(
            "histogram",
            "inference_extension_scheduler_e2e_duration_seconds",
            "One scheduling cycle.",
            (),
            _LATENCY,
        )
        self.scheduler_attempts = FastFamily(
            "counter",
            "inference_extension_scheduler_attempts_total",
            "Scheduling cycles by outcome.",
            ["status"],
        )
        self.plugin_duration = FastFamily(
            "histogram",
            "inference_extension_plugin_duration_seconds",
            "One plugin call.",
            ("extension_point", "plugin_type", "plugin_name"),
            _PLUGIN,
        )
        prefix_indexer_size = FastFamily(
            "gauge", "inference_extension_prefix_indexer_size", "Distinct prefix blocks in the index."
        )
        prefix_hit_ratio = FastFamily(
            "histogram",
            "inference_extension_prefix_indexer_hit_ratio",
            "Matched / total prefix blocks of the picked endpoint.",
            (),
            (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
        )
        prefix_hit_bytes = FastFamily(
            "histogram",
            "inference_extension_prefix_indexer_hit_bytes",
            "Matched prefix bytes of the picked endpoint.",
            (),
            (0, 64, 256, 1024, 4096, 16384, 65536, 262144),
        )
        self.scheduler_e2e = scheduler_e2e.histogram()
        self.prefix_indexer_size = prefix_indexer_size.value()
        self.prefix_hit_ratio = prefix_hit_ratio.histogram()
        self.prefix_hit_bytes = prefix_hit_bytes.histogram()
        return [
            scheduler_e2e,
            self.scheduler_attempts,
            self.plugin_duration,
            prefix_indexer_size,
            prefix_hit_ratio,
            prefix_hit_bytes,
        ]

    def _rare_counters(self, r: CollectorRegistry) -> None:
        """Errors, rewrites, aborts and fallbacks: rare, so plain ``prometheus_client`` counters."""
        self.request_error_total = Counter(
            "inference_objective_request_error_total",
            "Requests answered with an error by the picker.",
            ["model_name", "target_model_name", "error_code"],
            registry=r,
        )
        self.model_rewrite_total = Counter(
            "inference_extension_model_rewrite_decisions_total",
            "Model rewrites applied.",
            ["model_name", "target_model"],
            registry=r,
        )
        self.endpoint_reload_errors = Counter(
            "inferoute_epp_endpoint_source_errors_total",
            "Invalid endpoint source updates (kept the old list).",
            registry=r,
        )
        self.sessions_aborted = Counter(
            "inferoute_epp_sessions_aborted_total",
            "Picked requests the data plane reported as aborted.",
            ["reason"],
            registry=r,
        )
        self.stale_fallbacks = Counter(
            "inferoute_epp_stale_fallback_total",
            "Picks made over all endpoints because none had fresh metrics.",
            registry=r,
        )

    MAX_MODEL_SERIES = 100
    """Distinct (model, target) label pairs before further ones share ``other``: model names come from
    clients, and each pair adds ~100 lines (five histograms) to every /metrics page."""

    def bounded(self, model: str, target: str) -> tuple[str, str]:
        """The label pair to use for (model, target): itself, or ``("other", "other")`` when either name is
        longer than :data:`MAX_LABEL_CHARS` or the cap of pairs is reached (see :func:`bounded_labels`)."""
        return bounded_labels(self._series, self.MAX_MODEL_SERIES, model, target)

    def series(self, model: str, target: str) -> ModelSeries:
        s = self._series.get((model, target))
        if s is None:
            model, target = bounded_labels(self._series, self.MAX_MODEL_SERIES, model, target)
            s = self._series.get((model, target))
            if s is None:
                s = self._series[(model, target)] = ModelSeries(self, model, target)
        return s

    def watch_pool(self, datastore: Datastore, pool_name: str) -> None:
        """Expose the ``inference_pool_*`` gauges computed from ``datastore`` at collection time."""
        self._pool = _PoolCollector(datastore, pool_name, self)
        self.registry.register(self._pool)

    def unwatch_pool(self) -> None:
        if self._pool is not None:
            self.registry.unregister(self._pool)
            self._pool = None

    def watch(self, collector: Collector) -> None:
        """Expose another part's collection-time series (the cross-replica syncer's) until :meth:`close`."""
        self.registry.register(collector)
        self._watched.append(collector)

    def close(self) -> None:
        """Unregister every series of this picker, so the registry can host a new one (config reloads)."""
        self.unwatch_pool()
        while self._watched:
            self.registry.unregister(self._watched.pop())
        with contextlib.suppress(KeyError):
            self.registry.unregister(self._hot)
        for value in list(vars(self).values()):
            if isinstance(value, Counter | Gauge | Histogram):
                try:
                    self.registry.unregister(value)
                except KeyError:
                    continue

    def plugin_observer(
        self, extension_point: str, plugin_type: str, plugin_name: str
    ) -> Callable[[float], None]:
        return self.plugin_duration.histogram(extension_point, plugin_type, plugin_name).observe

    def on_scrape(self, key: str, ok: bool, seconds: float) -> None:
        self.scrape_counts["ok" if ok else "error"] += 1
        self.scrape_seconds += seconds
