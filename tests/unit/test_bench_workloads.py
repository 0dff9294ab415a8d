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
