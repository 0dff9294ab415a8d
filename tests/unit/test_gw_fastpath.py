"""Pure pieces of the gateway's per-request fast path: which answers are relayed whole, request ids, the
pre-bound metric series and the unlabelled totals, and freezing startup objects."""

from __future__ import annotations

import gc

from prometheus_client import CollectorRegistry, generate_latest

from inferoute.gateway.metrics import GatewayMetrics
from inferoute.gateway.relay import BUFFERED_ANSWER_MAX, buffered_answer, request_id_from
from inferoute.malloc import freeze_startup_objects


def test_buffered_answer_only_for_small_known_length_bodies() -> None:
    assert buffered_answer("POST", 200, 300, "application/json")
    assert buffered_answer("POST", 404, 0, None)
    assert buffered_answer("GET", 500, BUFFERED_ANSWER_MAX, "text/plain")
    assert not buffered_answer("POST", 200, BUFFERED_ANSWER_MAX + 1, "application/json")
    assert not buffered_answer("POST", 200, None, "application/json")  # chunked: stream it
    assert not buffered_answer("HEAD", 200, 300, "application/json")  # the length is not the body's
    assert not buffered_answer("GET", 204, 0, None)
    assert not buffered_answer("GET", 304, 0, None)
    assert not buffered_answer("GET", 101, 0, None)
    assert not buffered_answer("POST", 200, 30, " Text/Event-Stream; charset=utf-8")  # SSE is never held


def test_request_id_kept_when_sane_else_random() -> None:
    assert request_id_from("req-1") == "req-1"
    made = {request_id_from(v) for v in (None, "", "bad\nid", "x" * 129, "é")}
    assert len(made) == 5
    assert all(len(v) == 32 and int(v, 16) >= 0 for v in made)


def test_route_series_are_bound_once_and_update_the_labelled_metrics() -> None:
    reg = CollectorRegistry()
    m = GatewayMetrics(reg)
    s = m.for_route("/v1/")
    assert m.for_route("/v1/") is s
    assert s.requests(200) is s.requests(200)
    s.requests(200).inc()
    s.requests(503).inc(2)
    s.duration.observe(0.002)
    m.error("overloaded").inc()
    assert m.error("overloaded") is m.error("overloaded")
    get = reg.get_sample_value
    assert get("inferoute_gateway_requests_total", {"route": "/v1/", "code": "200"}) == 1
    assert get("inferoute_gateway_requests_total", {"route": "/v1/", "code": "503"}) == 2
    assert get("inferoute_gateway_request_duration_seconds_count", {"route": "/v1/"}) == 1
    assert get("inferoute_gateway_errors_total", {"cause": "overloaded"}) == 1


def test_totals_are_read_at_scrape_time() -> None:
    reg = CollectorRegistry()
    m = GatewayMetrics(reg)
    m.totals.in_flight = 3
    m.totals.bytes_in += 120
    m.totals.bytes_out += 4096
    text = generate_latest(reg).decode()
    assert "inferoute_gateway_in_flight_requests 3.0" in text
    assert "inferoute_gateway_request_bytes_total 120.0" in text
    assert "inferoute_gateway_response_bytes_total 4096.0" in text
    m.totals.in_flight = 0
    assert reg.get_sample_value("inferoute_gateway_in_flight_requests") == 0


def test_freeze_startup_objects() -> None:
    try:
        assert freeze_startup_objects() > 1000  # at least the modules imported so far
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0
