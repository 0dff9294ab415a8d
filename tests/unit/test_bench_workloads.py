"""Workloads: deterministic plans, arrival processes, sizing (pure)."""

from __future__ import annotations

import itertools
import json
import random
import statistics

import pytest

from inferoute.bench.workloads import (
    BLOCK_SIZE,
    CHARS_PER_TOKEN,
    TARGET_KV_FILL,
    Bursty,
    LongPrompt,
    MultiLora,
    SharedPrefix,
    burst_arrivals,
    get_workload,
    poisson_arrivals,
    words,
)
from inferoute.sim.tokenizer import count_tokens


def test_same_seed_gives_identical_plans_and_other_seed_differs() -> None:
    a = SharedPrefix().plan(rate=5, duration=20, seed=7)
    b = SharedPrefix().plan(rate=5, duration=20, seed=7)
    c = SharedPrefix().plan(rate=5, duration=20, seed=8)
    assert [(p.at, p.body) for p in a] == [(p.at, p.body) for p in b]
    assert [p.body for p in a] != [p.body for p in c]


def test_poisson_arrivals_have_the_requested_mean_rate() -> None:
    rng = random.Random(1)
    arrivals = poisson_arrivals(rng, rate=20, duration=500)
    assert arrivals == sorted(arrivals)
    assert all(0 <= t < 500 for t in arrivals)
    assert len(arrivals) / 500 == pytest.approx(20, rel=0.05)
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    # exponential gaps: standard deviation close to the mean
    assert statistics.stdev(gaps) == pytest.approx(statistics.mean(gaps), rel=0.1)


def test_burst_arrivals_keep_the_mean_rate_but_cluster() -> None:
    rng = random.Random(2)
    arrivals = burst_arrivals(rng, rate=10, duration=500, mean_burst=8, spread=0.01)
    assert len(arrivals) / 500 == pytest.approx(10, rel=0.1)
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    # far burstier than Poisson: the coefficient of variation of gaps is well above 1
    assert statistics.stdev(gaps) / statistics.mean(gaps) > 2


def test_shared_prefix_requests_of_a_group_share_the_system_prompt() -> None:
    wl = SharedPrefix(groups=3, users_per_group=2, system_prompt_len=100, question_len=10, output_len=5)
    plan = wl.plan(rate=50, duration=4, seed=1)
    by_group: dict[str, set[str]] = {}
    for p in plan:
        body = json.loads(p.body)
        assert body["stream"] is True and body["max_tokens"] == 5 and body["ignore_eos"] is True
        by_group.setdefault(p.group, set()).add(body["prompt"][: 100 * CHARS_PER_TOKEN])
    assert len(by_group) == 3
    assert all(len(prefixes) == 1 for prefixes in by_group.values())
    assert len({next(iter(s)) for s in by_group.values()}) == 3


def test_prompt_lengths_match_the_simulator_tokenizer() -> None:
    text = words(random.Random(0), 500)
    assert count_tokens(text) == 500
    wl = SharedPrefix(groups=2, users_per_group=2, system_prompt_len=300, question_len=20)
    p = wl.plan(rate=10, duration=2, seed=3)[0]
    assert count_tokens(json.loads(p.body)["prompt"]) == p.prompt_tokens == 320


def test_sizing_puts_the_working_set_at_the_target_fill() -> None:
    wl = SharedPrefix(groups=8, users_per_group=16, system_prompt_len=2048, question_len=64)
    sizing = wl.sizing(replicas=4)
    capacity = sizing.replicas * sizing.kv_cache_blocks * BLOCK_SIZE
    assert wl.working_set_tokens() / capacity == pytest.approx(TARGET_KV_FILL, rel=0.02)
    # one replica cannot hold every group's prefix: round-robin must thrash
    assert sizing.kv_cache_blocks * BLOCK_SIZE < wl.groups * wl.system_prompt_len


def test_multi_lora_has_more_adapters_than_slots_and_a_skewed_mix() -> None:
    wl = MultiLora(adapters=12, max_loras=2)
    sizing = wl.sizing(replicas=4)
    assert len(sizing.lora_adapters) > sizing.replicas * sizing.max_loras
    plan = wl.plan(rate=100, duration=20, seed=5)
    counts = {a: sum(1 for p in plan if p.model == a) for a in sizing.lora_adapters}
    assert counts["lora-0"] > 3 * counts["lora-11"] > 0
    assert all(json.loads(p.body)["model"] == p.group for p in plan)


def test_long_prompt_bodies_are_100_to_200_kb() -> None:
    wl = LongPrompt(documents=2)
    plan = wl.plan(rate=2, duration=5, seed=1)
    assert plan
    for p in plan:
        assert 100_000 <= len(json.loads(p.body)["prompt"]) <= 201_000


def test_bursty_is_shared_prefix_content() -> None:
    wl = Bursty(groups=2, users_per_group=2, system_prompt_len=50, question_len=5)
    plan = wl.plan(rate=10, duration=10, seed=1)
    assert {p.group for p in plan} <= {"g0", "g1"}
    assert wl.parameters()["mean_burst"] == 8.0


def test_get_workload_quick_shrinks_and_unknown_names_fail() -> None:
    full, quick = get_workload("shared-prefix"), get_workload("shared-prefix", quick=True)
    assert isinstance(full, SharedPrefix) and isinstance(quick, SharedPrefix)
    assert quick.working_set_tokens() < full.working_set_tokens()
    with pytest.raises(KeyError, match="unknown workload"):
        get_workload("nope")


def test_overload_workload_tags_tenants_and_priorities() -> None:
    import json as _json

    from inferoute.bench.workloads import OVERLOAD_SEQS

    w = get_workload("overload")
    plan = w.plan(40.0, 10.0, seed=1)
    groups = {p.group for p in plan}
    assert groups == {"tenant-a/interactive", "tenant-a/batch", "tenant-b/interactive", "tenant-b/batch"}
    a = sum(1 for p in plan if p.group.startswith("tenant-a"))
    assert 0.65 < a / len(plan) < 0.85
    for p in plan[:20]:
        h = dict(p.headers)
        tenant, cls = p.group.split("/")
        assert h == {"x-llm-d-inference-fairness-id": tenant, "x-llm-d-inference-objective": cls}
        assert _json.loads(p.body)["max_tokens"] == (16 if cls == "interactive" else 128)
    assert w.sizing(4).max_num_seqs == OVERLOAD_SEQS and w.per_group
    assert plan == w.plan(40.0, 10.0, seed=1)  # deterministic


def test_group_stats_and_the_flow_control_contenders() -> None:
    from inferoute.bench.loadgen import RequestResult
    from inferoute.bench.peers import profile_path, select_contenders
    from inferoute.bench.stats import group_stats
    from inferoute.clock import FakeClock
    from inferoute.epp.config import parse_config
    from inferoute.epp.learned import LocalLearnedState
    from inferoute.epp.plugin import PluginDeps

    ok = RequestResult(0, "a/interactive", "m", 5.0, sent=5.0, first_token=5.2, finished=6.0, status=200)
    shed = RequestResult(1, "a/batch", "m", 5.0, sent=5.0, finished=5.01, status=429, error="http-429")
    early = RequestResult(2, "a/batch", "m", 1.0, sent=1.0, finished=2.0, status=200)
    g = group_stats([ok, shed, early], warmup=2.0)
    assert g["a/interactive"]["ok"] == 1 and abs(g["a/interactive"]["ttft_p90"] - 0.2) < 1e-9
    assert g["a/batch"] == {"ttft_p90": g["a/batch"]["ttft_p90"], "ok": 0.0, "rejected": 1.0, "goodput": 0.0}
    names = [c.name for c in select_contenders("inferoute/flow-control,inferoute/objectives")]
    assert names == ["inferoute/flow-control", "inferoute/objectives"]
    assert "inferoute/flow-control" not in [c.name for c in select_contenders(None)]
    deps = PluginDeps(LocalLearnedState(), FakeClock())
    cfg = parse_config(profile_path("flow-control").read_text(), deps=deps)
    assert cfg.flow is not None and cfg.store.priority("batch") == -1
    assert parse_config(profile_path("objectives").read_text(), deps=deps).flow is None
