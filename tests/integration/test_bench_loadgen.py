"""The load generator against the real simulator over real sockets (127.0.0.1, ports chosen at run time)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from inferoute.bench.loadgen import LoadOptions, run_plan
from inferoute.bench.stats import summarize
from inferoute.bench.workloads import SharedPrefix
from inferoute.sim import FORCE_STATUS_HEADER, SimConfig, SimPool


@pytest.fixture
async def sim_url() -> AsyncIterator[str]:
    pool = await SimPool.start(SimConfig(time_scale=0.1, allow_forced_errors=True), replicas=1)
    try:
        yield f"http://{pool.endpoints[0].key}"
    finally:
        await pool.aclose()


def small_workload() -> SharedPrefix:
    return SharedPrefix(groups=2, users_per_group=3, system_prompt_len=256, question_len=16, output_len=6)


async def test_open_loop_run_records_streaming_metrics_and_cache_hits(sim_url: str) -> None:
    wl = small_workload()
    plan = wl.plan(rate=20, duration=1.5, seed=3)
    assert len(plan) >= 10
    seen: list[int] = []
    results = await run_plan(sim_url, plan, on_done=lambda r: seen.append(r.index))
    assert sorted(seen) == [p.index for p in plan]
    assert all(r.ok for r in results), [(r.error, r.error_message) for r in results if not r.ok]
    for r in results:
        assert r.status == 200
        assert r.output_tokens == 6
        assert r.prompt_tokens == 272
        assert r.ttft is not None and 0 < r.ttft < 5
        assert r.e2e is not None and r.e2e >= r.ttft
        assert len(r.itls) == 5
        assert r.served_by  # the simulator names its pod
    # open loop: requests start on schedule (generous bound for a shared 2-core machine)
    assert max(r.send_lag for r in results) < 0.5
    # two system prompts: after the first request of each group, later ones hit the prefix cache
    assert sum(r.cached_tokens > 0 for r in results) >= len(results) - 4
    s = summarize("direct", wl.name, 20, results, warmup=0.0)
    assert 0.5 < s.cache_hit_rate < 1.0
    assert s.output_tps > 0 and s.ttft_p90 >= s.ttft_p50


async def test_http_errors_are_recorded_with_status_and_body(sim_url: str) -> None:
    plan = small_workload().plan(rate=20, duration=0.5, seed=1)
    options = LoadOptions(headers=((FORCE_STATUS_HEADER, "503"),))
    results = await run_plan(sim_url, plan, options=options)
    assert results
    for r in results:
        assert (r.status, r.error) == (503, "http-503")
        assert '"error"' in r.error_message and r.output_tokens == 0
    s = summarize("direct", "w", 20, results, warmup=0.0)
    assert s.ok == 0 and s.errors == {"http-503": len(results)}


async def test_connection_refused_and_timeouts_are_errors_not_crashes(
    refused_port: Callable[[], int],
) -> None:
    plan = small_workload().plan(rate=20, duration=0.3, seed=1)
    results = await run_plan(f"http://127.0.0.1:{refused_port()}", plan)
    assert results and all(r.error == "connect" for r in results)

    pool = await SimPool.start(SimConfig(time_scale=20.0), replicas=1)  # 20x slower than real time
    try:
        slow = await run_plan(
            f"http://{pool.endpoints[0].key}", plan[:2], options=LoadOptions(request_timeout=0.3)
        )
    finally:
        await pool.aclose()
    assert [r.error for r in slow] == ["timeout", "timeout"]
