"""Pure helpers of ``inferoute bench gateway``: wrk output parsing, the report, the p99-bounded best rate."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from inferoute.bench.gateway import WrkResult, best_rate_under, parse_wrk, render_markdown

WRK = """Running 4s test @ http://127.0.0.1:8080/v1/chat/completions
  2 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   512.31us  201.00us   9.80ms   90.00%
    Req/Sec    15.60k     1.20k   17.00k    70.00%
  Latency Distribution
     50%  480.00us
     75%  600.00us
     90%  750.00us
     99%    1.20ms
  124000 requests in 4.00s, 40.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  31000.50
Transfer/sec:     10.00MB
"""


def test_parse_wrk() -> None:
    r = parse_wrk(WRK, 16)
    assert r == WrkResult(16, 31000.5, 0.48, 1.2, 7)
    with pytest.raises(ValueError):
        parse_wrk("garbage", 1)


def test_best_rate_under_bound_ignores_slow_and_failing_runs() -> None:
    runs = [
        WrkResult(1, 1000, 0.5, 2.0, 0),
        WrkResult(8, 5000, 1.0, 9.0, 0),
        WrkResult(16, 9000, 3.0, 25.0, 0),  # too slow at p99
        WrkResult(32, 9500, 2.0, 8.0, 3),  # errors
    ]
    best = best_rate_under(runs, 10.0)
    assert best is not None and best.connections == 8
    assert best_rate_under([WrkResult(1, 10, 50.0, 90.0, 0)], 10.0) is None


def test_scaling_summary_pairs_alternating_rounds() -> None:
    from inferoute.bench.gateway import scaling_summary

    s = scaling_summary([1000.0, 1100.0, 900.0, 1000.0], [1900.0, 2000.0, 1900.0, math.nan])
    # the failed last round (NaN) is left out with its partner: medians of three pairs
    assert s["one_worker_rps"] == 1000.0 and s["two_workers_rps"] == 1900.0 and s["ratio"] == 1.9
    assert s["ratio_min"] == pytest.approx(2000 / 1100) and s["ratio_max"] == pytest.approx(1900 / 900)
    assert all(math.isnan(v) for v in scaling_summary([0.0], [10.0]).values())


def test_tree_cpu_seconds_of_this_process() -> None:
    import os

    from inferoute.bench.gateway import tree_cpu_seconds

    assert tree_cpu_seconds(os.getpid()) > 0
    assert math.isnan(tree_cpu_seconds(2**22 + 12345))  # no such process


def test_run_delay_and_cpu_counters_of_this_machine() -> None:
    import os

    from inferoute.bench.gateway import busy_and_steal, cpu_times, tree_run_delay_seconds

    assert tree_run_delay_seconds(os.getpid(), descendants=False) >= 0
    assert math.isnan(tree_run_delay_seconds(2**22 + 12345))
    before = cpu_times()
    assert len(before) == 8
    # user nice system idle iowait irq softirq steal: 30 busy + 10 stolen out of 100
    assert busy_and_steal((0,) * 8, (20, 0, 10, 50, 10, 0, 0, 10)) == (0.4, 0.1)
    assert all(math.isnan(v) for v in busy_and_steal(before, before))
    assert all(math.isnan(v) for v in busy_and_steal((), before))


def test_render_markdown_reports_added_latency() -> None:
    paths = {
        "direct": {
            "fixed_rate_p50_ms": 0.2,
            "fixed_rate_p99_ms": 0.5,
            "wrk": [{"connections": 1, "requests_per_s": 100.0, "p50_ms": 0.1, "p99_ms": 0.2, "errors": 0}],
            "sse_events_per_s": 1000.0,
        },
        "gw": {
            "fixed_rate_p50_ms": 0.9,
            "fixed_rate_p99_ms": 2.5,
            "wrk": [{"connections": 4, "requests_per_s": 50.0, "p50_ms": 1.0, "p99_ms": 20.0, "errors": 0}],
            "sse_events_per_s": 900.0,
            "wrk_cpu_us_per_request": [200.0, 300.0, math.nan],  # median interpolated, NaN skipped
        },
    }
    result = {
        "when": "now",
        "machine": {"cpus": 2, "load_before": "1 1 1"},
        "options": {"rate": 200.0},
        "paths": paths,
        "bbr": {"body_mb": 10.0, "extract_model_gb_s": 3.0, "json_loads_gb_s": 0.5},
    }
    text = render_markdown(result)
    assert "| gw | 0.900 ms | 2.500 ms | +0.700 ms | +2.000 ms | none | 50 | 250 µs | 900 |" in text
    assert "| direct | 0.200 ms | 0.500 ms | - | - | 100 (1) | 100 | - | 1,000 |" in text
    assert "(6.0x)" in text
    assert "waiting for a CPU" not in text  # results of older versions have no scheduler figures
    assert "--workers 2" not in text
    result["scaling"] = {
        "connections": 32,
        "rounds": 3,
        "seconds": 4.0,
        "one_worker_rps": 2000.0,
        "two_workers_rps": 3800.0,
        "ratio": 1.9,
        "ratio_min": 1.8,
        "ratio_max": 1.95,
        "one_worker_cores": 1.0,
        "two_workers_cores": 1.85,
        "one_worker_rps_per_core": 2000.0,
        "two_workers_rps_per_core": 2054.0,
    }
    assert (
        "`--workers 2` against 1 worker (`wrk -c32`, 3 alternating rounds of 4 s, medians): 3,800 vs 2,000 "
        "req/s, **1.90x** (per round 1.80-1.95x); the gateway's processes got 1.85 vs 1.00 cores (median CPU "
        "seconds per second), 2,054 vs 2,000 req/s per core." in render_markdown(result)
    )
    paths["direct"] |= {"fixed_rate_wait_us": 3.0, "fixed_rate_client_wait_us": 40.0}
    paths["gw"] |= {"fixed_rate_wait_us": 1234.0, "fixed_rate_client_wait_us": 50.0}
    result["machine"] |= {"fixed_rate_cpu_busy": 0.25, "fixed_rate_cpu_steal": 0.012}
    text = render_markdown(result)
    assert "CPUs were 25% busy (1.2% stolen by the hypervisor)" in text
    assert "`direct` 3 / 40 µs, `gw` 1,234 / 50 µs." in text
    result["bbr"] = {
        "body_mb": 10.0,
        "model_reader_gb_s": 4.0,
        "extract_model_gb_s": 2.0,
        "json_loads_gb_s": 0.5,
    }
    text = render_markdown(result)
    assert "`ModelReader` (simdjson) 4.00 GB/s, `extract_model` (msgspec) 2.00 GB/s" in text
    assert "(8.0x)" in text
    result["bbr"] = {"body_mb": 10.0, "body_parser_gb_s": 5.0, "msgspec_gb_s": 2.5, "json_loads_gb_s": 0.5}
    text = render_markdown(result)
    assert (
        "`BodyParser` (simdjson) 5.00 GB/s, `parse_body` (msgspec) 2.50 GB/s, `json.loads` 0.50 GB/s" in text
    )
    assert "(10.0x)" in text


def test_baseline_paths_need_a_baseline_source(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from inferoute.bench.gateway import command

    res = CliRunner().invoke(command, ["--out", str(tmp_path), "--paths", "inferoute-baseline"])
    assert res.exit_code == 2 and "--baseline" in res.output


def test_gateway_process_runs_a_baseline_source(tmp_path: Path) -> None:
    from inferoute.bench.gateway import gateway_process

    base = gateway_process(tmp_path, "b", 1234, "127.0.0.1:9", picker=False, source=tmp_path / "src")
    assert base.env == {"PYTHONPATH": str(tmp_path / "src")}
    assert gateway_process(tmp_path, "c", 1235, "127.0.0.1:9", picker=True).env is None
