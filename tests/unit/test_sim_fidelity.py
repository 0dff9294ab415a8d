"""The fidelity benchmark's pure parts: stamp extraction from raw reads, percentiles, the summary."""

from __future__ import annotations

import math

import pytest

from inferoute.bench.sim_fidelity import Level, markdown, max_sustained, percentile, summarize, token_stamps


def event(scheduled: float, written: float) -> bytes:
    return (
        b'data: {"id":"cmpl-1","choices":[{"index":0,"text":" a"}],"sim_scheduled_at":%.6f,'
        b'"sim_written_at":%.6f}\n\n' % (scheduled, written)
    )


def test_token_stamps_across_reads_and_http_framing() -> None:
    one, two, three = event(1.0, 1.001), event(1.01, 1.011), event(1.02, 1.021)
    framed = b"%x\r\n%b\r\n" % (len(one + two), one + two)
    reads = [
        (5.0, 5.1, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + framed[:40]),
        (6.0, 6.1, framed[40:]),  # completes both events
        (7.0, 7.1, b"%x\r\n" % len(three) + three[:30]),
        (8.0, 8.1, three[30:] + b"\r\n0\r\n\r\n"),
    ]
    assert token_stamps(reads) == [(6.0, 6.1, 1.0, 1.001), (6.0, 6.1, 1.01, 1.011), (8.0, 8.1, 1.02, 1.021)]


def test_percentile_interpolates_sorted_values() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))


def test_summarize_keeps_the_window_and_converts_to_ms() -> None:
    stamps = [
        (0.5 + 0.002, 0.5 + 0.003, 0.5, 0.5 + 0.001),  # before the window: warm-up
        (1.0 + 0.002, 1.0 + 0.004, 1.0, 1.0 + 0.001),
        (2.0 + 0.004, 2.0 + 0.005, 2.0, 2.0 + 0.001),
    ]
    lv = summarize(10, stamps, (1.0, 3.0), requests=3, errors=0, sim_cpu_pct=12.0)
    assert lv.tokens == 2 and lv.tokens_per_s == 1.0
    assert lv.delay_p50_ms == pytest.approx(3.0)
    assert lv.delay_max_ms == pytest.approx(4.0)
    assert lv.server_p99_ms == pytest.approx(1.0)
    assert lv.client_p99_ms == pytest.approx(4.99)  # between 4 and 5 ms, interpolated


def test_max_sustained_needs_p99_under_target_and_no_errors() -> None:
    levels = [
        Level(50, tokens=10, delay_p99_ms=1.0),
        Level(100, tokens=10, delay_p99_ms=4.9),
        Level(200, tokens=10, delay_p99_ms=3.0, errors=1),
        Level(400, tokens=10, delay_p99_ms=9.0),
    ]
    assert max_sustained(levels, 5.0) == 100
    assert max_sustained(levels, 0.5) == 0
    table = markdown(levels, 5.0)
    assert "| 100 |" in table and "9.00 ✗" in table
