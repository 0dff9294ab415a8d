"""Prometheus metrics of the gateway, registered on an injected :class:`CollectorRegistry` (never
the default).

Names (all ``inferoute_gateway_*``):

* ``requests_total{route,code}`` — finished requests by HTTP status.
* ``request_duration_seconds{route}`` — from the request line to the last response byte.
* ``ttfb_seconds{route}`` — from the request line to the first response byte sent to the client.
* ``picker_duration_seconds{route}`` / ``bbr_duration_seconds{route}`` — time deciding.
* ``errors_total{cause}`` — every failure by cause (also those fail-open swallowed).
* ``upstream_fallbacks_total{route,reason}`` — an endpoint skipped for the next one (``connect`` or ``5xx``).
* ``fail_open_total{route}`` — requests sent to the fail-open destination after a picker failure.
* ``in_flight_requests`` — requests being handled by this process.
* ``request_bytes_total`` / ``response_bytes_total`` — body bytes in and out.

Cost on the request path: the labelled series of a route are bound once (:meth:`GatewayMetrics.for_route`;
prometheus-client's ``.labels()`` costs microseconds); counters and histograms are :class:`LoopCounter` /
:class:`LoopHistogram` families, plain numbers updated without a lock (one event loop per process updates
them; prometheus-client takes a lock per increment, two for a histogram observation) and exposed by a
collector at scrape time in the usual format; the three unlabelled figures are plain
integers on :class:`Totals`.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
)
_FAST_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class CounterChild:
    """One labelled counter series."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class HistogramChild:
    """One labelled histogram series: per-bucket (non-cumulative) counts, the last one for ``+Inf``."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bound >= value: Prometheus' "le"
        self.sum += value


class LoopCounter(Collector):
    """A labelled counter family for one event loop (see module docstring); ``labels(...)`` like
    prometheus-client's, exposed as ``<name>_total``."""

    def __init__(self, name: str, doc: str, labelnames: Sequence[str], registry: CollectorRegistry) -> None:
        self.name = name
        self.doc = doc
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], CounterChild] = {}
        registry.register(self)

    def labels(self, *values: str) -> CounterChild:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = CounterChild()
        return child

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.doc, labels=self.labelnames)
        for values, child in list(self._children.items()):
            family.add_metric(list(values), child.value)
        yield family


class LoopHistogram(Collector):
    """A labelled histogram family for one event loop (see module docstring); ``labels(...)`` like
    prometheus-client's, exposed as ``_bucket{le}`` (cumulative), ``_count`` and ``_sum``."""

    def __init__(
        self,
        name: str,
        doc: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.doc = doc
        self.labelnames = tuple(labelnames)
        self.bounds = tuple(float(b) for b in buckets)
        self._children: dict[tuple[str, ...], HistogramChild] = {}
        registry.register(self)

    def labels(self, *values: str) -> HistogramChild:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = HistogramChild(self.bounds)
        return child

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
        les = [*(_le(b) for b in self.bounds), "+Inf"]
        for values, child in list(self._children.items()):
            running = 0
            buckets: list[tuple[str, float]] = []
            for le, n in zip(les, child.counts, strict=True):
                running += n
                buckets.append((le, running))
            family.add_metric(list(values), buckets, child.sum)
        yield family


def _le(bound: float) -> str:
    """A bucket bound as prometheus-client writes it (``0.005``, ``1.0``)."""
    return repr(float(bound))


class Totals:
    """The process's unlabelled figures, updated in place by the handler (one event loop: no lock)."""

    __slots__ = ("bytes_in", "bytes_out", "in_flight")

    def __init__(self) -> None:
        self.in_flight = 0
        self.bytes_in = 0
        self.bytes_out = 0


class _TotalsCollector(Collector):
    """Exposes :class:`Totals`: ``in_flight_requests``, ``request_bytes_total``, ``response_bytes_total``."""

    def __init__(self, prefix: str, totals: Totals) -> None:
        self._prefix = prefix
        self._totals = totals

    def collect(self) -> Iterator[Metric]:
        p, t = self._prefix, self._totals
        yield GaugeMetricFamily(p + "in_flight_requests", "Requests being handled.", value=t.in_flight)
        yield CounterMetricFamily(p + "request_bytes", "Request body bytes received.", value=t.bytes_in)
        yield CounterMetricFamily(p + "response_bytes", "Response body bytes sent.", value=t.bytes_out)


class RouteSeries:
    """The labelled series of one route, bound once; ``requests`` and ``errors`` children by status / cause
    are bound on first use (a handful of values each)."""

    __slots__ = ("_requests", "bbr", "codes", "duration", "fail_open", "picker", "route", "ttfb")

    def __init__(self, m: GatewayMetrics, route: str) -> None:
        self.route = route
        self.duration = m.duration.labels(route)
        self.ttfb = m.ttfb.labels(route)
        self.bbr = m.bbr.labels(route)
        self.picker = m.picker.labels(route)
        self.fail_open = m.fail_open.labels(route)
        self._requests = m.requests
        self.codes: dict[int, CounterChild] = {}

    def requests(self, status: int) -> CounterChild:
        """The ``requests_total{route, code}`` child for ``status``."""
        child = self.codes.get(status)
        if child is None:
            child = self.codes[status] = self._requests.labels(self.route, str(status))
        return child


class GatewayMetrics:
    """All gateway series; one instance per process, passed down from the app assembly."""

    def __init__(self, registry: CollectorRegistry) -> None:
        p = "inferoute_gateway_"
        self.requests = LoopCounter(
            p + "requests", "Finished requests.", ["route", "code"], registry=registry
        )
        self.duration = LoopHistogram(
            p + "request_duration_seconds",
            "Request duration.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttfb = LoopHistogram(
            p + "ttfb_seconds",
            "Time to first response byte.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.picker = LoopHistogram(
            p + "picker_duration_seconds",
            "Endpoint picker latency.",
            ["route"],
            buckets=_FAST_BUCKETS,
            registry=registry,
        )
        self.bbr = LoopHistogram(
            p + "bbr_duration_seconds",
            "Body-based routing latency.",
            ["route"],
            buckets=_FAST_BUCKETS,
            registry=registry,
        )
        self.errors = LoopCounter(p + "errors", "Failures by cause.", ["cause"], registry=registry)
        self.fallbacks = LoopCounter(
            p + "upstream_fallbacks",
            "Endpoints skipped for the next in the list.",
            ["route", "reason"],
            registry=registry,
        )
        self.fail_open = LoopCounter(
            p + "fail_open", "Requests routed fail-open after a picker failure.", ["route"], registry=registry
        )
        self.totals = Totals()
        registry.register(_TotalsCollector(p, self.totals))
        self._routes: dict[str, RouteSeries] = {}
        self._errors: dict[str, CounterChild] = {}

    def for_route(self, route: str) -> RouteSeries:
        """The bound series of ``route`` (a configured route path, or ``-`` before one matched)."""
        series = self._routes.get(route)
        if series is None:
            series = self._routes[route] = RouteSeries(self, route)
        return series

    def error(self, cause: str) -> CounterChild:
        """The ``errors_total{cause}`` child (causes: a fixed vocabulary of the gateway and its pickers)."""
        child = self._errors.get(cause)
        if child is None:
            child = self._errors[cause] = self.errors.labels(cause)
        return child
