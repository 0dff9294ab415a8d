"""Flow-control metrics under the reference's names, and the scarcity / autoscaling signals.

Every family is emitted twice, as ``llm_d_epp_flow_control_*`` and as the deprecated
``inference_extension_flow_control_*`` twin (the reference dual-emits them too). Counters and histograms are
updated on the request path (:class:`~inferoute.fastmetrics.FastFamily`: plain numbers); gauges are computed
when the registry is collected, from the controller's state, so they cost the request path nothing.

Recommended replicas (``inferoute_epp_flow_control_recommended_replicas``), the HPA rule applied to the
pool's saturation plus the queued work::

    desired = ceil(ready * saturation / target + queued / per_replica)     (0 when both terms are 0)

``ready`` = endpoints in the pool, ``saturation`` = the detector's pool saturation (1.0 = every endpoint at
its thresholds), ``target`` = 0.8 (scale before the ceiling), ``queued`` = requests waiting in flow control,
``per_replica`` = what one replica takes at saturation 1.0 (``maxConcurrency`` of the concurrency detector,
``queueDepthThreshold`` of the utilization detector). With an empty pool and queued requests it asks for
at least 1 (scale from zero).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from inferoute.fastmetrics import DescribedFastCollector, FastFamily, FastHistogram, FastValue, Kind

if TYPE_CHECKING:
    from inferoute.epp.flowcontrol.controller import FlowController

PREFIXES = ("llm_d_epp_", "inference_extension_")
PoolState = Callable[[], tuple[int, dict[str, float], int, float]]
"""(ready endpoints, saturation by stage, stale endpoints, per-replica capacity), read at collection."""
_QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_CYCLE_BUCKETS = (0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05)
TARGET_SATURATION = 0.8
MAX_FAIRNESS_IDS = 100


def recommended_replicas(ready: int, saturation: float, queued: int, per_replica: float) -> int:
    """The replica count the documented rule asks for (see module docstring)."""
    load = ready * max(0.0, saturation) / TARGET_SATURATION + queued / max(per_replica, 1e-9)
    return max(1 if queued else 0, math.ceil(load - 1e-9))


class FlowControlMetrics:
    """The families, registered on ``registry`` (one instance per picker)."""

    def __init__(self, registry: CollectorRegistry, pool: str) -> None:
        self.registry = registry
        self.pool = pool
        self._fairness: set[str] = set()
        fams: list[FastFamily] = []

        def twin(
            kind: Kind, name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...] = ()
        ) -> list[FastFamily]:
            out = [FastFamily(kind, p + "flow_control_" + name, doc, labels, buckets) for p in PREFIXES]
            fams.extend(out)
            return out

        self._requests = twin(
            "counter", "requests_total", "Flow-control outcomes.", ("outcome", "priority", "inference_pool")
        )
        self._queue = twin(
            "histogram",
            "request_queue_duration_seconds",
            "Time from enqueue to the outcome.",
            ("fairness_id", "priority", "outcome", "inference_pool", "model_name", "target_model_name"),
            _QUEUE_BUCKETS,
        )
        self._cycle = twin(
            "histogram", "dispatch_cycle_duration_seconds", "One dispatch cycle.", (), _CYCLE_BUCKETS
        )
        self._issued = twin(
            "counter", "revocations_issued_total", "In-flight evictions issued.", ("inference_pool",)
        )
        self._revocations = twin(
            "counter",
            "revocations_total",
            "In-flight evictions retired, by outcome (confirmed | timed_out).",
            ("outcome", "inference_pool"),
        )
        self._reclaim_target = twin(
            "gauge", "reclaim_target", "Last eviction deficit (saturation - ceiling).", ("inference_pool",)
        )
        self._pending_reclaim = twin(
            "gauge",
            "pending_reclaim",
            "Saturation credited to evictions not yet visible in the gauge.",
            ("inference_pool",),
        )
        self._confirmation = twin(
            "histogram",
            "revocation_confirmation_seconds",
            "Eviction issued to the evicted request's answer ending.",
            ("inference_pool",),
            _QUEUE_BUCKETS,
        )
        self._hot = DescribedFastCollector(fams)
        registry.register(self._hot)
        self._gauges: Collector | None = None

    def fairness_label(self, fairness_id: str) -> str:
        """The fairness id as a label, or ``other`` past 100 distinct ids (client-chosen values)."""
        if fairness_id in self._fairness or len(self._fairness) < MAX_FAIRNESS_IDS:
            self._fairness.add(fairness_id)
            return fairness_id
        return "other"

    def outcome(
        self, outcome: str, priority: int, fairness_id: str, model: str, target: str, waited: float
    ) -> None:
        p = str(priority)
        fid = self.fairness_label(fairness_id)
        for c in self._requests:
            c.value(outcome, p, self.pool).inc()
        for h in self._queue:
            h.histogram(fid, p, outcome, self.pool, model, target).observe(waited)

    def cycle(self, seconds: float) -> None:
        for h in self._cycle:
            h.histogram().observe(seconds)

    # -- eviction (ReclamationMetrics) ---------------------------------------------------------------------
    def issued(self, n: int) -> None:
        for c in self._issued:
            c.value(self.pool).inc(n)

    def retired(self, outcome: str, seconds: float) -> None:
        for c in self._revocations:
            c.value(outcome, self.pool).inc()
        for h in self._confirmation:
            h.histogram(self.pool).observe(seconds)

    def target(self, value: float) -> None:
        for g in self._reclaim_target:
            g.value(self.pool).set(value)

    def pending(self, value: float) -> None:
        for g in self._pending_reclaim:
            g.value(self.pool).set(value)

    def watch(self, core: FlowController, state: PoolState) -> None:
        """Expose the gauges; ``state()`` = (ready endpoints, saturation by stage, stale endpoints,
        per-replica capacity)."""
        self._gauges = _Gauges(self, core, state)
        self.registry.register(self._gauges)

    def close(self) -> None:
        for c in (self._hot, self._gauges):
            if c is not None:
                try:
                    self.registry.unregister(c)
                except KeyError:
                    continue


class _Gauges(Collector):
    def __init__(
        self,
        m: FlowControlMetrics,
        core: FlowController,
        state: PoolState,
    ) -> None:
        self.m, self.core, self.state = m, core, state

    def collect(self) -> Iterator[GaugeMetricFamily]:
        pool = self.m.pool
        core = self.core
        ready, stages, stale, per_replica = self.state()
        saturation = stages.get("effective", 1.0)
        sizes: dict[tuple[str, str, str, str], list[int]] = defaultdict(lambda: [0, 0])
        for item in core.items():
            prep = getattr(item.payload, "prep", None)
            req = getattr(prep, "request", None)
            model = getattr(req, "model", "")
            target = getattr(req, "target_model", "")
            acc = sizes[(self.m.fairness_label(item.fairness_id), str(item.priority), model, target)]
            acc[0] += 1
            acc[1] += item.size
        for prefix in PREFIXES:
            fc = prefix + "flow_control_"
            lab = ["fairness_id", "priority", "inference_pool", "model_name", "target_model_name"]
            qs = GaugeMetricFamily(fc + "queue_size", "Requests queued in flow control.", labels=lab)
            qb = GaugeMetricFamily(fc + "queue_bytes", "Bytes queued in flow control.", labels=lab)
            for (fid, prio, model, target), (n, b) in sizes.items():
                qs.add_metric([fid, prio, pool, model, target], n)
                qb.add_metric([fid, prio, pool, model, target], b)
            sat = GaugeMetricFamily(
                fc + "pool_saturation",
                "Pool saturation (1.0 = at the thresholds).",
                labels=["inference_pool", "stage"],
            )
            for stage, value in stages.items():
                sat.add_metric([pool, stage], value)
            cap_r = GaugeMetricFamily(
                fc + "capacity_utilization_requests",
                "Band queue use / its maxRequests.",
                labels=["priority", "inference_pool"],
            )
            cap_b = GaugeMetricFamily(
                fc + "capacity_utilization_bytes",
                "Band queue use / its maxBytes.",
                labels=["priority", "inference_pool"],
            )
            for p, band in core.bands.items():
                cap_r.add_metric([str(p), pool], band.count / band.config.max_requests)
                cap_b.add_metric([str(p), pool], band.bytes / band.config.max_bytes)
            yield from (qs, qb, sat, cap_r, cap_b)
            cfg = core.config
            if cfg.max_requests:
                g = GaugeMetricFamily(
                    fc + "global_capacity_utilization_requests",
                    "Queue use / maxRequests.",
                    labels=["inference_pool"],
                )
                g.add_metric([pool], core.count / cfg.max_requests)
                yield g
            if cfg.max_bytes:
                g = GaugeMetricFamily(
                    fc + "global_capacity_utilization_bytes",
                    "Queue bytes / maxBytes.",
                    labels=["inference_pool"],
                )
                g.add_metric([pool], core.bytes / cfg.max_bytes)
                yield g
        st = GaugeMetricFamily(
            "llm_d_epp_flow_control_stale_endpoints",
            "Endpoints counted saturated for stale metrics.",
            labels=["detector"],
        )
        st.add_metric([core.config.detector.type_name], stale)
        rec = GaugeMetricFamily(
            "inferoute_epp_flow_control_recommended_replicas",
            "Replicas the pool needs: ceil(ready*saturation/0.8 + queued/per_replica).",
            labels=["inference_pool"],
        )
        rec.add_metric([pool], recommended_replicas(ready, saturation, core.count, per_replica))
        yield from (st, rec)


__all__ = ["FastHistogram", "FastValue", "FlowControlMetrics", "recommended_replicas"]
