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
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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


class GatewayMetrics:
    """All gateway series; one instance per process, passed down from the app assembly."""

    def __init__(self, registry: CollectorRegistry) -> None:
        p = "inferoute_gateway_"
        self.requests = Counter(p + "requests", "Finished requests.", ["route", "code"], registry=registry)
        self.duration = Histogram(
            p + "request_duration_seconds",
            "Request duration.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttfb = Histogram(
            p + "ttfb_seconds",
            "Time to first response byte.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.picker = Histogram(
            p + "picker_duration_seconds",
            "Endpoint picker latency.",
            ["route"],
            buckets=_FAST_BUCKETS,
            registry=registry,
        )
        self.bbr = Histogram(
            p + "bbr_duration_seconds",
            "Body-based routing latency.",
            ["route"],
            buckets=_FAST_BUCKETS,
            registry=registry,
        )
        self.errors = Counter(p + "errors", "Failures by cause.", ["cause"], registry=registry)
        self.fallbacks = Counter(
            p + "upstream_fallbacks",
            "Endpoints skipped for the next in the list.",
            ["route", "reason"],
            registry=registry,
        )
        self.fail_open = Counter(
            p + "fail_open", "Requests routed fail-open after a picker failure.", ["route"], registry=registry
        )
        self.in_flight = Gauge(p + "in_flight_requests", "Requests being handled.", registry=registry)
        self.bytes_in = Counter(p + "request_bytes", "Request body bytes received.", registry=registry)
        self.bytes_out = Counter(p + "response_bytes", "Response body bytes sent.", registry=registry)
