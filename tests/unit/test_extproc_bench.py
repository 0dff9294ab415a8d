"""The picker benchmark's pure parts: wrk output parsing and the Markdown report."""

from __future__ import annotations

import math

from inferoute.bench.picker import DecisionsResult, WrkResult, parse_wrk, render_markdown

WRK = """Running 10s test @ http://127.0.0.1:8080/v1/completions
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    12.01ms    3.10ms  40.00ms   80.00%
  Latency Distribution
     50%   11.50ms
     75%   13.00ms
     90%   15.00ms
     99%    1.20s
  4000 requests in 10.00s, 1.00MB read
  Non-2xx or 3xx responses: 3
Requests/sec:    400.00
Transfer/sec:    100.00KB
"""


def test_parse_wrk_units_and_counts() -> None:
    r = parse_wrk("x", WRK)
    assert r.requests_per_second == 400.0 and r.requests == 4000 and r.non_2xx == 3
    assert r.p50_ms == 11.5 and r.p99_ms == 1200.0
    empty = parse_wrk("y", "connection refused")
    assert empty.requests == 0 and math.isnan(empty.p50_ms)


def test_markdown_has_added_latency_and_per_cpu_figures() -> None:
    d = DecisionsResult("trivial", 64, 10.0, 12_000, 0, 4.0)
    assert d.per_wall_second == 1200.0 and d.per_cpu_second == 3000.0
    base = WrkResult("envoy direct", 1000.0, 2.0, 5.0, 10_000, 0)
    picked = WrkResult(
        "envoy + trivial picker, full-duplex", 500.0, 3.5, 9.0, 5000, 0, picker_cpu_seconds=5.0
    )
    assert picked.picker_cpu_ms_per_request == 1.0
    base.connections = picked.connections = 50
    text = render_markdown(
        [d], [base, picked], [base, picked], command="inferoute bench picker", conditions="c"
    )
    assert "50 concurrent request(s)" in text
    assert "| trivial | 64 | 1,200 | 3,000 | 0 |" in text
    assert "+1.50 | +4.00 | 1.00 | 0 |" in text
    assert "`inferoute bench picker`" in text
