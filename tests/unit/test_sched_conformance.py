"""One conformance suite run over every registered scorer and picker (built from the registry, default
parameters): the contracts the engine relies on."""

from __future__ import annotations

import math
import random

import pytest
from test_epp_rig import cand, ctx

from inferoute.clock import FakeClock
from inferoute.epp.learned import Inflight, LocalLearnedState, Placed
from inferoute.epp.plugin import Params, PluginDeps
from inferoute.epp.scheduling.prefix import prefix_hashes
from inferoute.epp.scheduling.registry import builtin_registry
from inferoute.epp.scheduling.types import Candidate, PickerPlugin, Scorer

REGISTRY = builtin_registry()
SCORERS = REGISTRY.types("scorer")
PICKERS = REGISTRY.types("picker")


def _make(type_name: str, learned: LocalLearnedState) -> object:
    return REGISTRY.create(type_name, type_name, Params({}, type_name), PluginDeps(learned, FakeClock(), 1))


def _pool(n: int, seed: int) -> list[Candidate]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        c = cand(
            f"10.0.0.{i}:8000",
            waiting=rng.randint(0, 20),
            running=rng.randint(0, 50),
            kv_usage=rng.random(),
            max_lora=rng.choice([0, 2]),
            active_adapters=frozenset(rng.sample(["a", "b", "c"], rng.randint(0, 2))),
            block_size=rng.choice([None, 16]),
        )
        pending = rng.randint(0, 3)
        c.inflight = Inflight(pending=pending, pending_tokens=pending * 100)
        out.append(c)
    return out


def test_every_builtin_is_covered() -> None:
    assert {
        "queue-scorer",
        "kv-cache-utilization-scorer",
        "running-requests-size-scorer",
        "lora-affinity-scorer",
        "prefix-cache-scorer",
        "session-affinity-scorer",
        "predicted-ttft-scorer",
    } <= set(SCORERS)
    assert {"max-score-picker", "random-picker", "weighted-random-picker", "round-robin-picker"} <= set(
        PICKERS
    )


@pytest.mark.parametrize("type_name", SCORERS)
@pytest.mark.parametrize("n", [1, 2, 17])
def test_scorer_contract(type_name: str, n: int) -> None:
    learned = LocalLearnedState()
    prompt = b"shared system prompt " * 40
    scorer = _make(type_name, learned)
    assert isinstance(scorer, Scorer) and scorer.type_name == type_name
    pool = _pool(n, seed=n)
    learned.apply([Placed(pool[0].key, tuple(prefix_hashes("a", prompt)), 16)])
    c = ctx(model="a", prompt=prompt, headers={"x-session-id": "s"}, learned=learned)
    scores = list(scorer.score(c, pool))
    assert len(scores) == n, "one score per candidate"
    assert all(math.isfinite(s) and 0.0 <= s <= 1.0 for s in scores), scores
    # deterministic for the same state, and independent of candidate order
    assert list(scorer.score(c, pool)) == scores
    rev = list(scorer.score(c, pool[::-1]))
    assert rev[::-1] == pytest.approx(scores)


@pytest.mark.parametrize("type_name", PICKERS)
@pytest.mark.parametrize("n", [1, 3, 50])
def test_picker_contract(type_name: str, n: int) -> None:
    picker = _make(type_name, LocalLearnedState())
    assert isinstance(picker, PickerPlugin) and picker.type_name == type_name
    pool = _pool(n, seed=n)
    c = ctx()
    for _ in range(20):
        picked = picker.pick(c, pool, [c.rng.random() for _ in pool])
        assert len(picked) == 1, "maxNumOfEndpoints defaults to 1"
        assert picked[0] in pool
    assert picker.pick(c, [], []) == []


@pytest.mark.parametrize("type_name", PICKERS)
def test_picker_fallbacks_are_distinct_candidates(type_name: str) -> None:
    picker = REGISTRY.create(
        type_name,
        type_name,
        Params({"maxNumOfEndpoints": 3}, type_name),
        PluginDeps(LocalLearnedState(), FakeClock(), 1),
    )
    assert isinstance(picker, PickerPlugin)
    pool = _pool(5, seed=5)
    picked = picker.pick(ctx(), pool, [i / 5 for i in range(len(pool))])
    assert len(picked) == 3 and len({p.key for p in picked}) == 3
    assert all(p in pool for p in picked)
