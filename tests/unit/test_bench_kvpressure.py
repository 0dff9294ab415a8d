"""The KV-pressure workload, the precise contender's wiring (KV events on, labels for the picker) and the
capacity-at-SLO figure of ``inferoute bench routing``."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from inferoute.bench.peers import SimPool, gateway_config, select_contenders, sim_argv
from inferoute.bench.routing import capacity_at_slo, capacity_table
from inferoute.bench.stats import PointSummary
from inferoute.bench.workloads import BLOCK_SIZE, KVPressure, get_workload
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
