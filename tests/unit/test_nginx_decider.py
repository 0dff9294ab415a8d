"""Pure parts of the NGINX decider: redirect headers, completion reports, pending sessions (no sockets)."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from inferoute.clock import FakeClock
from inferoute.gateway.config import RouteConfig
from inferoute.gateway.nginx_decider.protocol import (
    header_variable,
    nginx_retries,
    redirect_headers,
    request_headers_for_decision,
)
from inferoute.gateway.nginx_decider.reports import (
    CompletionReport,
    PendingSessions,
    echo_status,
    end_session,
    parse_report,
    parse_syslog_report,
)
from inferoute.gateway.routing import RoutedRequest
from inferoute.picking import NullSession


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[object, ...]] = []

    def response_started(self, served: str, status: int, headers: Mapping[str, str]) -> None:
        self.events.append(("started", served, status))

    def response_chunk(self, chunk: bytes) -> None:
        self.events.append(("chunk",))

    def response_finished(self) -> None:
        self.events.append(("finished",))

    def aborted(self, reason: str) -> None:
        self.events.append(("aborted", reason))


def routed(
    upstreams: tuple[str, ...], model: str | None = "m", set_headers: dict[str, str] | None = None
) -> RoutedRequest:
    route = RouteConfig(path="/v1/")
    return RoutedRequest(
        route=route,
        model=model,
        upstreams=upstreams,
        headers=[],
        set_headers=set_headers if set_headers is not None else {"X-Gateway-Model-Name": model or ""},
        body=b"",
        session=NullSession(),
        source="picker",
    )


def test_redirect_headers_carry_upstream_fallbacks_model_and_token() -> None:
    four = ("10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000", "10.0.0.4:8000")
    h = redirect_headers(routed(four), "tok", max_fallbacks=2)
    assert h["X-Accel-Redirect"] == "@inference_retry"
    assert h["X-Inference-Upstream"] == "10.0.0.1:8000"
    assert h["X-Inference-Fallback-1"] == "10.0.0.2:8000"
    assert h["X-Inference-Fallback-2"] == "10.0.0.3:8000"
    assert "X-Inference-Fallback-3" not in h  # NGINX can walk only two
    assert h["X-Inference-Fallbacks"] == "10.0.0.2:8000,10.0.0.3:8000"
    assert h["X-Inference-Model"] == "m"
    assert h["X-Inference-Request-Id"] == "tok"
    # the model header itself is not duplicated as a pass-through header
    assert not any(k.startswith("X-Inference-Hdr-") for k in h)


def test_redirect_headers_single_endpoint_no_model_and_picker_mutations() -> None:
    d = routed(("10.0.0.1:8000",), model=None, set_headers={"X-Gateway-Inference-Objective": "critical"})
    h = redirect_headers(d, "t", max_fallbacks=3)
    assert h["X-Accel-Redirect"] == "@inference"  # nothing to fall back to
    assert h["X-Inference-Model"] == ""
    assert "X-Inference-Fallbacks" not in h and "X-Inference-Fallback-1" not in h
    assert h["X-Inference-Hdr-x-gateway-inference-objective"] == "critical"
    assert header_variable("X-Inference-Hdr-x-gateway-inference-objective") == (
        "x_inference_hdr_x_gateway_inference_objective"
    )


def test_redirect_headers_follow_a_picker_rewrite_of_the_model_header() -> None:
    d = routed(("10.0.0.1:8000",), model="alias", set_headers={"x-gateway-model-name": "real-model"})
    assert redirect_headers(d, "t")["X-Inference-Model"] == "real-model"


def test_nginx_retries_header_caps_the_fallbacks() -> None:
    assert nginx_retries({"X-Inference-Retries": "2"}, 8) == 2
    assert nginx_retries({"X-Inference-Retries": "5"}, 3) == 3
    assert nginx_retries({}, 8) == 0  # a hand-written config without fallback locations
    assert nginx_retries({"X-Inference-Retries": "-1"}, 8) == 0
    h = redirect_headers(routed(("a:1", "b:2")), "t", max_fallbacks=0)
    assert h["X-Accel-Redirect"] == "@inference" and "X-Inference-Fallback-1" not in h


def test_request_headers_for_decision_drop_hop_by_hop_and_protocol_names() -> None:
    given = [
        ("Host", "h"),
        ("Connection", "keep-alive, X-Hop"),
        ("X-Hop", "named in Connection"),
        ("Transfer-Encoding", "chunked"),
        ("Trailers", "x"),
        ("Proxy-Authorization", "Basic x"),
        ("X-Inference-Upstream", "evil:1"),
        ("x-accel-redirect", "@x"),
        ("X-Inference-Request-Id", "forged"),
        ("Content-Type", "application/json"),
        ("X-Gateway-Model-Name", "spoof"),
    ]
    kept = request_headers_for_decision(given)
    # routing headers such as X-Gateway-Model-Name are the decision core's job (it strips or replaces them)
    assert kept == [("Host", "h"), ("Content-Type", "application/json"), ("X-Gateway-Model-Name", "spoof")]


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (
            {
                "x-inference-served": "127.0.0.1:9000 : 10.0.0.1:8000",
                "x-inference-upstream-status": "200 : 200",
                "x-inference-completion": "OK",
                "x-inference-client-status": "200",
                "x-inference-header-time": "0.001 : 0.020",
            },
            CompletionReport("10.0.0.1:8000", 200, True, 200, True),
        ),
        (  # fallback walked: the last address served
            {
                "x-inference-served": "127.0.0.1:9000 : 10.0.0.1:8000 : 10.0.0.2:8000",
                "x-inference-upstream-status": "200 : 502 : 503",
                "x-inference-completion": "OK",
                "x-inference-header-time": "0.001 : - : 0.004",
            },
            CompletionReport("10.0.0.2:8000", 503, True, None, True),
        ),
        (  # connection refused everywhere
            {
                "x-inference-served": "127.0.0.1:9000 : 10.0.0.1:8000",
                "x-inference-upstream-status": "200 : 502",
                "x-inference-completion": "",
                "x-inference-header-time": "0.001 : -",
            },
            CompletionReport("10.0.0.1:8000", 502, False, None, False),
        ),
        ({}, CompletionReport(None, None, False, None, True)),
        (
            {"x-inference-served": "unix:/run/x.sock", "x-inference-upstream-status": "-"},
            CompletionReport(None, None, False),
        ),
    ],
)
def test_parse_report(headers: dict[str, str], expected: CompletionReport) -> None:
    assert parse_report(headers) == expected


def test_outcomes_drive_the_session() -> None:
    ok, incomplete, failed = Recorder(), Recorder(), Recorder()
    assert end_session(ok, CompletionReport("a:1", 200, True)) == "ok"
    assert ok.events == [("started", "a:1", 200), ("finished",)]
    assert end_session(incomplete, CompletionReport("a:1", 200, False)) == "incomplete"
    assert incomplete.events == [("started", "a:1", 200), ("aborted", "incomplete")]
    assert end_session(failed, CompletionReport("a:1", 502, False, answered=False)) == "upstream-error"
    assert failed.events == [("aborted", "upstream-error")]


def test_echo_status_keeps_the_logged_status_sane() -> None:
    assert echo_status(200) == 200
    assert echo_status(502) == 502
    assert echo_status(499) == 499
    assert echo_status(None) == 204
    assert echo_status(101) == 204
    assert echo_status(304) == 204


def test_pending_sessions_expire_in_order_with_an_injected_clock() -> None:
    clock = FakeClock()
    pending = PendingSessions(clock, timeout=10.0)
    a, b = Recorder(), Recorder()
    ta = pending.open(a)
    clock.advance(4)
    tb = pending.open(b)
    assert ta != tb and len(ta) >= 16
    assert len(pending) == 2
    clock.advance(6)  # a's deadline reached, b's not
    assert pending.expire() == [a]
    assert pending.pop(ta) is None
    assert pending.pop(tb) is b
    assert pending.pop(tb) is None
    assert pending.expire() == []
    c = Recorder()
    pending.open(c)
    assert pending.drain() == [c] and len(pending) == 0


def test_parse_syslog_report() -> None:
    datagram = (
        b"<190>Nov 22 21:30:00 inferoute: inferoute-report|abc123|127.0.0.1:9 : 10.0.0.1:8000|200 : 200|"
        b"0.001 : 0.020|OK|200"
    )
    assert parse_syslog_report(datagram) == (
        "abc123",
        CompletionReport("10.0.0.1:8000", 200, True, 200, True),
    )
    aborted = (
        b"<190>x inferoute: inferoute-report|t|127.0.0.1:9 : 10.0.0.1:8000|200 : 200|0.001 : 0.002||200\n"
    )
    token, report = parse_syslog_report(aborted) or ("", CompletionReport(None, None, False))
    assert token == "t" and report.outcome == "incomplete"
    assert parse_syslog_report(b"<190>x nginx: something else") is None
    assert parse_syslog_report(b"inferoute-report||a|200|0|OK|200") is None  # no token
    assert parse_syslog_report(b"inferoute-report|t|a|200") is None  # truncated


def test_decider_completes_sessions_from_datagrams_and_expires_the_rest() -> None:
    from prometheus_client import CollectorRegistry

    from inferoute.gateway.nginx_decider.handler import NginxDecider

    clock = FakeClock()
    registry = CollectorRegistry()
    decider = NginxDecider(lambda path: None, registry=registry, clock=clock, completion_timeout=60.0)
    done, lost = Recorder(), Recorder()
    token = decider.pending.open(done)
    decider.pending.open(lost)
    decider.datagram(
        b"<190>t inferoute: inferoute-report|" + token.encode() + b"|d:1 : e:2|200 : 200|0 : 0.1|OK|200"
    )
    assert done.events == [("started", "e:2", 200), ("finished",)]
    decider.datagram(
        b"<190>t inferoute: inferoute-report|" + token.encode() + b"|d:1 : e:2|200 : 200|0 : 0.1|OK|200"
    )
    decider.datagram(b"garbage")
    clock.advance(61)
    assert decider.expire_sessions() == 1
    assert lost.events == [("aborted", "completion-timeout")]

    def count(outcome: str) -> float | None:
        return registry.get_sample_value("inferoute_nginx_completions_total", {"outcome": outcome})

    assert (count("ok"), count("unknown-token"), count("unparsable"), count("completion-timeout")) == (
        1,
        1,
        1,
        1,
    )
    assert registry.get_sample_value("inferoute_nginx_pending_sessions") == 0
