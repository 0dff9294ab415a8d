"""Point summaries, knees and target checks (pure)."""

from __future__ import annotations

import math

import pytest

from inferoute.bench.loadgen import RequestResult
from inferoute.bench.stats import (
    PointSummary,
    check_lora_waits,
    check_shared_prefix,
    knee,
    percentile,
    server_delta,
    summarize,
)


def result(
    i: int,
    scheduled: float,
    ttft: float,
    out: int = 10,
    prompt: int = 100,
    cached: int = 0,
    error: str | None = None,
    served: str = "a",
) -> RequestResult:
    r = RequestResult(i, "g", "m", scheduled)
    r.sent = scheduled
    r.first_token = scheduled + ttft
    r.finished = scheduled + ttft + 1.0
    r.itls = [0.1] * (out - 1)
    r.itl_sum = 0.1 * (out - 1)
    r.output_tokens, r.prompt_tokens, r.cached_tokens = out, prompt, cached
    r.error = error
    r.served_by = served
    return r


def test_percentile_interpolates_like_numpy() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([1, 2, 3, 4], 90) == pytest.approx(3.7)
    assert percentile([5], 99) == 5
    assert math.isnan(percentile([], 50))


def test_summarize_excludes_warmup_and_counts_errors() -> None:
    results = [result(0, 0.5, ttft=9.0)]  # warm-up: left out
    results += [result(i, 1.0 + i, ttft=0.1 * i, cached=50, served="ab"[i % 2]) for i in range(1, 11)]
    results.append(result(11, 12.0, ttft=0.2, error="http-503"))
    s = summarize("c", "w", 1.0, results, warmup=1.0)
    assert (s.planned, s.measured, s.ok) == (12, 11, 10)
    assert s.errors == {"http-503": 1}
    assert s.ttft_p50 == pytest.approx(0.55)
    assert s.ttft_p90 == pytest.approx(0.91)
    assert s.cache_hit_rate == pytest.approx(0.5)
    assert s.itl_p90 == pytest.approx(0.1)
    # window: first measured send (2.0) to last finish (12.0 + 0.2 + 1.0)
    assert s.output_tps == pytest.approx(100 / 11.2)
    assert s.served == {"a": 5, "b": 5}
    assert s.as_dict()["ttft_p50"] == pytest.approx(0.55)


def point(
    name: str,
    rate: float,
    ttft: float,
    tps: float = 0.0,
    req_tps: float | None = None,
    server: dict[str, float] | None = None,
) -> PointSummary:
    p = PointSummary(name, "w", rate, planned=100, measured=100, ok=100)
    p.ttft_p90 = ttft
    p.output_tps = tps
    p.request_tps = rate if req_tps is None else req_tps
    p.server = server or {}
    return p


def test_knee_is_the_last_rate_before_latency_or_goodput_breaks() -> None:
    pts = [point("c", 1, 0.1), point("c", 2, 0.12), point("c", 4, 0.25), point("c", 8, 3.0)]
    k = knee(pts)
    assert (k.rate, k.saturated_at) == (4, 8)
    assert "p90 TTFT" in k.reason
    starved = [point("c", 1, 0.1), point("c", 2, 0.1, req_tps=1.2)]
    assert knee(starved).rate == 1 and "completed" in knee(starved).reason
    assert knee([point("c", 1, 0.1)]).saturated_at is None


def test_shared_prefix_targets_are_judged_at_round_robin_knee() -> None:
    pts = [
        point("rr", 1, 1.0, tps=100),
        point("rr", 2, 1.5, tps=180),
        point("rr", 4, 20.0, tps=200),
        point("ours", 1, 0.1, tps=100),
        point("ours", 2, 0.2, tps=250),
        point("ours", 4, 0.3, tps=400),
        point("peer", 1, 0.5, tps=100),
        point("peer", 2, 0.4, tps=190),
        point("peer", 4, 9.0, tps=220),
    ]
    rate, checks = check_shared_prefix(pts, "rr", ["ours"], ["peer"])
    assert rate == 2
    assert [c.passed for c in checks] == [True, True, True, True, True]
    assert "ratio 0.13" in checks[0].detail
    assert "knee, 2/s" in checks[2].name and "ratio 1.39" in checks[2].detail
    # throughput is also compared where round-robin saturates (4/s): 400 vs 200
    assert "saturates, 4/s" in checks[3].name and "ratio 2.00" in checks[3].detail
    assert "peak" in checks[4].name and "ratio 2.00" in checks[4].detail
    # a worse configuration misses, and the miss names the ratio (no ours2 point at 4/s: no "saturates" check)
    pts.append(point("ours2", 2, 1.0, tps=150))
    _, checks = check_shared_prefix([p for p in pts if p.contender != "ours"], "rr", ["ours2"], ["peer"])
    assert [c.passed for c in checks] == [False, False, False, False]
    assert "ratio 0.67" in checks[0].detail
    assert "150 tok/s vs rr 200 tok/s at 2/s vs 4/s" in checks[3].detail


def test_lora_waits_target_compares_totals_over_rates() -> None:
    pts = [
        point("ours", 1, 0.1, server={"w": 3}),
        point("ours", 2, 0.1, server={"w": 4}),
        point("peer", 1, 0.1, server={"w": 5}),
        point("peer", 2, 0.1, server={"w": 9}),
    ]
    [check] = check_lora_waits(pts, ["ours"], ["peer"], "w")
    assert check.passed and "7 waits" in check.detail
    [check] = check_lora_waits(pts, ["peer"], ["ours"], "w")
    assert not check.passed


def test_server_delta() -> None:
    assert server_delta({"a": 1.0}, {"a": 4.0, "b": 2.0}) == {"a": 3.0, "b": 2.0}
