"""Prometheus metrics of the NGINX decider, registered on an injected registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class DeciderMetrics:
    """Prometheus metrics of the decider, registered on the registry passed in."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.decisions = Counter(
            "inferoute_nginx_decisions_total",
            "Requests answered by the NGINX decider, by result.",
            ["result"],
            registry=registry,
        )
        self.errors = Counter(
            "inferoute_nginx_decider_errors_total",
            "Error answers of the NGINX decider, by status and cause.",
            ["status", "cause"],
            registry=registry,
        )
        self.completions = Counter(
            "inferoute_nginx_completions_total",
            "Picker sessions ended, by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.pending = Gauge(
            "inferoute_nginx_pending_sessions",
            "Picker sessions waiting for NGINX's completion report.",
            registry=registry,
        )
        self.swallowed = Counter(
            "inferoute_nginx_fail_open_total",
            "Picker or BBR failures swallowed by fail-open, by cause.",
            ["cause"],
            registry=registry,
        )
        self.latency = Histogram(
            "inferoute_nginx_decision_seconds",
            "Time from request received to decision answered.",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=registry,
        )
