"""The KV-pressure workload, the precise contender's wiring (KV events on, labels for the picker) and the
capacity-at-SLO figure of ``inferoute bench routing``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from inferoute.bench.peers import SimPool, gateway_config, select_contenders, sim_argv
from inferoute.bench.routing import capacity_at_slo, capacity_table, cpu_table
from inferoute.bench.stats import PointSummary, check_kv_pressure
from inferoute.bench.workloads import BLOCK_SIZE, KVPressure, get_workload
from inferoute.errors import InferouteError
from inferoute.kvevents.config import KV_EVENTS_LABEL, KV_REPLAY_LABEL, parse_kv_events_config


def test_kv_pressure_working_set_is_about_72_percent_of_the_pool() -> None:
    wl = get_workload("kv-pressure")
    assert isinstance(wl, KVPressure)
    sizing = wl.sizing(replicas=4)
    capacity = sizing.replicas * sizing.kv_cache_blocks * BLOCK_SIZE
    assert wl.working_set_tokens() / capacity == pytest.approx(0.72, rel=0.02)
    # no replica can hold every group: groups must be partitioned, and evictions happen
    assert sizing.kv_cache_blocks * BLOCK_SIZE < wl.groups * wl.system_prompt_len / 2
    assert len({r.group for r in wl.plan(20, 20, 1)}) == wl.groups


def test_precise_contender_gets_the_pools_kv_events(tmp_path: Path) -> None:
    pool = SimPool(9000, 2, kv_base=9100)
    (precise,) = select_contenders("inferoute/precise")
    sizing = get_workload("kv-pressure").sizing(2)
    argv = sim_argv(sizing, pool.base_port, 1.0, 1, pool.kv_base)
    events = parse_kv_events_config(argv[argv.index("--kv-events-config") + 1])
    assert events.enabled and events.for_rank(1).endpoint == "tcp://*:9101"
    assert events.for_rank(1).replay_endpoint == "tcp://*:9103"
    labels = pool.labels()
    assert labels[1] == {KV_EVENTS_LABEL: "tcp://127.0.0.1:9101", KV_REPLAY_LABEL: "tcp://127.0.0.1:9103"}
    cfg = gateway_config(8080, pool.urls, tmp_path / "p.yaml", labels)
    assert cfg["pool"]["endpoints"][1]["labels"] == labels[1]  # type: ignore[index]
    assert SimPool(9000, 2).labels() == [{}, {}]
    assert "--kv-events-config" not in sim_argv(sizing, 9000, 1.0, 1)
    argv = precise.argv(8080, pool.urls, tmp_path, labels)
    written = yaml.safe_load(Path(argv[argv.index("--config") + 1]).read_text())
    assert written["picker"]["config_file"].endswith("precise.yaml")
    assert written["pool"]["endpoints"][0]["labels"] == labels[0]


def point(name: str, rate: float, p90: float, ok: int = 10) -> PointSummary:
    return PointSummary(name, "kv-pressure", rate, planned=10, measured=10, ok=ok, ttft_p90=p90)


def test_capacity_at_slo_is_the_highest_rate_with_every_lower_rate_under_it() -> None:
    a = [point("a", 4, 0.2), point("a", 8, 0.5), point("a", 12, 1.5), point("a", 16, 0.9)]
    assert capacity_at_slo(a) == 8  # 16 is under the bound again, but 12 was not
    assert capacity_at_slo([point("b", 4, 2.0)]) == 0
    assert capacity_at_slo([point("c", 4, math.nan)]) == 0
    assert capacity_at_slo([point("d", 4, 0.1, ok=0)]) == 0
    table = capacity_table([*a, point("b", 4, 0.1), point("b", 8, 0.2), point("b", 12, 0.3)])
    assert table.index("| b | 12 |") < table.index("| a | 8 |")


def test_the_precise_profiles_speculate_and_precise_local_tokenizes_in_the_picker() -> None:
    from inferoute.bench.peers import profile_path, select_contenders
    from inferoute.clock import FakeClock
    from inferoute.epp.config import parse_config
    from inferoute.epp.learned import LocalLearnedState
    from inferoute.epp.plugin import PluginDeps
    from inferoute.epp.scheduling.plugins.precise_prefix_producer import PrecisePrefixProducer
    from inferoute.epp.scheduling.plugins.token_producer import TokenProducer

    assert [c.name for c in select_contenders("inferoute/precise-local")] == ["inferoute/precise-local"]
    assert "inferoute/precise-local" not in [c.name for c in select_contenders(None)]
    deps = PluginDeps(LocalLearnedState(), FakeClock())
    for name, renders in [("precise", True), ("precise-local", False)]:
        plugins = parse_config(profile_path(name).read_text(), deps=deps).plugins
        producer, tokens = plugins["precise-prefix-cache-producer"], plugins["token-producer"]
        assert isinstance(producer, PrecisePrefixProducer) and isinstance(tokens, TokenProducer)
        assert producer.index.speculative_ttl == 2.0 and producer.index.block_size == 64
        assert (tokens.render is not None) == renders


def series(name: str, p90s: dict[float, float]) -> list[PointSummary]:
    return [point(name, rate, p90) for rate, p90 in p90s.items()]


def test_kv_pressure_targets_compare_best_profile_with_best_peer() -> None:
    ours = ["inferoute/gie-default", "inferoute/predicted-ttft"]
    peers = ["sglang-router/cache_aware", "vllm-router/cache_aware"]
    rates = (10, 20, 30, 40)
    points = [
        *series("inferoute/gie-default", dict(zip(rates, (0.2, 0.3, 0.5, 0.9), strict=True))),
        *series("inferoute/predicted-ttft", dict(zip(rates, (0.2, 0.3, 1.5, 2.0), strict=True))),
        *series("sglang-router/cache_aware", dict(zip(rates, (0.3, 0.4, 1.2, 3.0), strict=True))),
        *series("vllm-router/cache_aware", dict(zip(rates, (0.3, 1.4, 2.0, 3.0), strict=True))),
    ]
    capacity, per_rate, ptt = check_kv_pressure(points, ours, peers, slo=1.0)
    # gie-default holds the SLO at every measured rate (a lower bound: ≥ 40) vs sglang's 20: 2x
    assert capacity.passed and "≥ 40/s" in capacity.detail and "ratio 2.00" in capacity.detail
    assert per_rate.passed and "at 3 rate(s)" in per_rate.detail  # 10, 20, 30 ≤ 1.5 x 20
    assert not ptt.passed and "predicted-ttft 20/s" in ptt.detail
    # a slower point inside 1.5x the peer's capacity, and a capacity short of 1.5x, are misses
    worse = [point("inferoute/gie-default", 10, 0.35), *points[1:]]
    assert not check_kv_pressure(worse, ours, peers, 1.0)[1].passed
    assert "worse at 10/s 0.350s vs 0.300s" in check_kv_pressure(worse, ours, peers, 1.0)[1].detail
    assert not check_kv_pressure(points, ours, peers, slo=0.45)[0].passed  # 20 vs 20: ratio 1
    assert not check_kv_pressure(points[:4], ours, [], 1.0)[0].passed  # no peer measured


def test_capacity_table_in_wall_and_h100_terms() -> None:
    points = [*series("a", {4: 0.5, 8: 5.0}), *series("b", {4: 1.0, 8: 2.0})]
    table = capacity_table(points, slo=4.0, time_scale=4.0)
    assert "p90 TTFT < 4 s" in table and "1 s and rate x 4 at H100 speed" in table
    assert "| a | 4 | 16 |" in table and "| b | ≥ 8 | ≥ 32 |" in table  # b never crossed the bound
    assert "H100" not in capacity_table(points, slo=1.0)


def test_gateway_scrapes_as_often_in_engine_steps_at_any_time_scale(tmp_path: Path) -> None:
    workers = ["http://127.0.0.1:9001"]
    at_1 = gateway_config(8080, workers, tmp_path / "p.yaml")["picker"]
    at_4 = gateway_config(8080, workers, tmp_path / "p.yaml", time_scale=4.0)["picker"]
    assert at_1["refresh_interval"] == 0.05 and at_1["staleness_threshold"] == 2.0  # type: ignore[index]
    assert at_4["refresh_interval"] == 0.2 and at_4["staleness_threshold"] == 8.0  # type: ignore[index]
    (gie,) = select_contenders("inferoute/gie-default")
    argv = gie.argv(8080, workers, tmp_path, time_scale=2.0)
    written = yaml.safe_load(Path(argv[argv.index("--config") + 1]).read_text())
    assert written["picker"]["refresh_interval"] == 0.1


def test_cpu_table_shows_each_roles_cores_and_waits() -> None:
    p = point("a", 4, 0.2)
    p.cpu = {
        "sim_cpu": 0.31,
        "sim_wait": 0.012,
        "router_cpu": 0.2,
        "router_wait": 0.004,
        "loadgen_cpu": 0.1,
        "loadgen_wait": 0.001,
        "machine_busy": 0.45,
        "load1": 2.5,
    }
    table = cpu_table([p, point("b", 4, 0.2)])
    assert "| a | 4 | 0.31 / 0.012 | 0.20 / 0.004 | 0.10 / 0.001 | 45% | 2.5 |" in table
    assert "| b |" not in table  # no CPU figures (an older run.json): no row
    assert cpu_table([point("b", 4, 0.2)]) == ""


def test_runs_of_one_rate_each_merge_into_one_report(tmp_path: Path) -> None:
    from inferoute.bench import report
    from inferoute.bench.routing import RunConfig, rebuild_reports

    contenders = select_contenders("inferoute/gie-default,sglang-router/cache_aware")
    for i, (rate, p90s) in enumerate([(10.0, (0.2, 0.3)), (20.0, (0.4, 1.5))]):
        cfg = RunConfig(["kv-pressure"], {"kv-pressure": [rate]}, contenders, seed=3, command=f"run {i}")
        pts = [point(c.name, rate, p90) for c, p90 in zip(contenders, p90s, strict=True)]
        (tmp_path / str(i)).mkdir()
        report.write_json(tmp_path / str(i) / "run.json", cfg.meta(), pts, {}, {})
    text = rebuild_reports([tmp_path / "0" / "run.json", tmp_path / "1" / "run.json"], tmp_path / "all")
    assert "`run 0; run 1`" in text
    assert "| inferoute/gie-default | ≥ 20 |" in text and "| sglang-router/cache_aware | 10 |" in text
    merged = json.loads((tmp_path / "all" / "run.json").read_text())
    assert merged["meta"]["rates"] == {"kv-pressure": [10.0, 20.0]} and len(merged["points"]) == 4
    assert merged["targets"]["kv-pressure"][0]["passed"]  # ≥ 20 vs 10: 2x
    other = RunConfig(["kv-pressure"], {"kv-pressure": [30.0]}, contenders, seed=4)
    (tmp_path / "2").mkdir()
    report.write_json(tmp_path / "2" / "run.json", other.meta(), [], {}, {})
    with pytest.raises(InferouteError, match="seed 4 differs"):
        rebuild_reports([tmp_path / "0" / "run.json", tmp_path / "2" / "run.json"], tmp_path / "x")
    ha = RunConfig(["kv-pressure"], {"kv-pressure": [30.0]}, contenders, seed=3, router_replicas=2)
    (tmp_path / "3").mkdir()
    report.write_json(tmp_path / "3" / "run.json", ha.meta(), [], {}, {})
    with pytest.raises(InferouteError, match="router_replicas 2 differs"):  # one router vs two: no merge
        rebuild_reports([tmp_path / "0" / "run.json", tmp_path / "3" / "run.json"], tmp_path / "x")
    old = json.loads((tmp_path / "0" / "run.json").read_text())
    del old["meta"]["router_replicas"]  # a run.json from before --router-replicas: one router
    (tmp_path / "0" / "run.json").write_text(json.dumps(old))
    assert "| inferoute/gie-default | ≥ 20 |" in rebuild_reports(
        [tmp_path / "0" / "run.json", tmp_path / "1" / "run.json"], tmp_path / "all"
    )
    text = rebuild_reports([tmp_path / "3" / "run.json"], tmp_path / "ha")
    assert "2 instances of each router" in text and "share in-flight load and prefix placements" in text
    alone = RunConfig(["kv-pressure"], {"kv-pressure": [30.0]}, contenders, seed=3, router_replicas=2)
    alone.router_sync = False  # --no-router-sync: independent instances, like the first HA runs
    (tmp_path / "4").mkdir()
    report.write_json(tmp_path / "4" / "run.json", alone.meta(), [], {}, {})
    with pytest.raises(InferouteError, match="router_sync False differs"):  # synced vs independent
        rebuild_reports([tmp_path / "3" / "run.json", tmp_path / "4" / "run.json"], tmp_path / "x")
    assert "every instance on its own" in rebuild_reports([tmp_path / "4" / "run.json"], tmp_path / "solo")


def test_kv_cache_blocks_overrides_the_workloads_pool_sizing() -> None:
    from inferoute.bench.routing import RunConfig

    wl = get_workload("kv-pressure")
    own = RunConfig(["kv-pressure"], {"kv-pressure": [4.0]}, [])
    big = RunConfig(["kv-pressure"], {"kv-pressure": [4.0]}, [], kv_cache_blocks=27000)
    assert own.sizing(wl) == wl.sizing(4) and own.meta()["kv_cache_blocks"] is None
    assert (
        big.sizing(wl).kv_cache_blocks == 27000 and big.sizing(wl).max_num_seqs == wl.sizing(4).max_num_seqs
    )
    assert big.meta()["kv_cache_blocks"] == 27000


def test_a_slower_warmup_offers_its_own_rate_then_the_points() -> None:
    from inferoute.bench.routing import RunConfig

    wl = get_workload("kv-pressure")
    same = RunConfig(["kv-pressure"], {"kv-pressure": [30.0]}, [], duration=20, warmup=10, seed=2)
    ramp = RunConfig(
        ["kv-pressure"], {"kv-pressure": [30.0]}, [], duration=20, warmup=10, seed=2, warmup_rate=5.0
    )
    full, slow = same.plan(wl, 30.0), ramp.plan(wl, 30.0)
    assert full == wl.plan(30.0, 20, 2)
    warm = [r for r in slow if r.at < 10]
    assert 25 <= len(warm) <= 80 and len([r for r in full if r.at < 10]) > 200  # ~5/s instead of ~30/s
    assert [r.body for r in slow if r.at >= 10] == [r.body for r in full if r.at >= 10]  # the measured part
    assert [r.index for r in slow] == list(range(len(slow)))
    assert ramp.meta()["warmup_rate"] == 5.0
