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
prometheus-client's ``.labels()`` costs microseconds); counters and histograms are
:class:`~inferoute.fastmetrics.FastFamily` families, plain numbers updated without a lock (one event loop per
process updates them; prometheus-client takes a lock per increment, two for a histogram observation) and
exposed by a collector at scrape time in the usual format; the three unlabelled figures are plain
integers on :class:`Totals`.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from inferoute.fastmetrics import FastCollector, FastFamily, FastValue

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
        self.duration = m.duration.histogram(route)
        self.ttfb = m.ttfb.histogram(route)
        self.bbr = m.bbr.histogram(route)
        self.picker = m.picker.histogram(route)
        self.fail_open = m.fail_open.value(route)
        self._requests = m.requests
        self.codes: dict[int, FastValue] = {}

    def requests(self, status: int) -> FastValue:
        """The ``requests_total{route, code}`` child for ``status``."""
        child = self.codes.get(status)
        if child is None:
            child = self.codes[status] = self._requests.value(self.route, str(status))
        return child


class GatewayMetrics:
    """All gateway series; one instance per process, passed down from the app assembly."""

    def __init__(self, registry: CollectorRegistry) -> None:
        p = "inferoute_gateway_"
        self.requests = FastFamily("counter", p + "requests", "Finished requests.", ["route", "code"])
        self.duration = FastFamily(
            "histogram",
            p + "request_duration_seconds",
            "Request duration.",
            ["route"],
            _LATENCY_BUCKETS,
        )
        self.ttfb = FastFamily(
            "histogram",
            p + "ttfb_seconds",
            "Time to first response byte.",
            ["route"],
            _LATENCY_BUCKETS,
        )
        self.picker = FastFamily(
            "histogram",
            p + "picker_duration_seconds",
            "Endpoint picker latency.",
            ["route"],
            _FAST_BUCKETS,
        )
        self.bbr = FastFamily(
            "histogram",
            p + "bbr_duration_seconds",
            "Body-based routing latency.",
            ["route"],
            _FAST_BUCKETS,
        )
        self.errors = FastFamily("counter", p + "errors", "Failures by cause.", ["cause"])
        self.fallbacks = FastFamily(
            "counter",
            p + "upstream_fallbacks",
            "Endpoints skipped for the next in the list.",
            ["route", "reason"],
        )
        self.fail_open = FastFamily(
            "counter", p + "fail_open", "Requests routed fail-open after a picker failure.", ["route"]
        )
        # All eight families behind one collector, read at scrape time: one registry entry instead of eight.
        # It has no ``describe`` (no registration-time name check): the ``inferoute_gateway_*`` names are
        # fixed here and no other collector of the gateway's registry uses that prefix.
        registry.register(
            FastCollector(
                [
                    self.requests,
                    self.duration,
                    self.ttfb,
                    self.picker,
                    self.bbr,
                    self.errors,
                    self.fallbacks,
                    self.fail_open,
                ]
            )
        )
        self.totals = Totals()
        registry.register(_TotalsCollector(p, self.totals))
        self._routes: dict[str, RouteSeries] = {}
        self._errors: dict[str, FastValue] = {}

    def for_route(self, route: str) -> RouteSeries:
        """The bound series of ``route`` (a configured route path, or ``-`` before one matched)."""
        series = self._routes.get(route)
        if series is None:
            series = self._routes[route] = RouteSeries(self, route)
        return series

    def error(self, cause: str) -> FastValue:
        """The ``errors_total{cause}`` child (causes: a fixed vocabulary of the gateway and its pickers)."""
        child = self._errors.get(cause)
        if child is None:
            child = self._errors[cause] = self.errors.value(cause)
        return child
