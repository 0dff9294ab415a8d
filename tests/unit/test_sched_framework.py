"""The engine: clamping, weights, timing, failures and learning after the pick."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import ClassVar

import pytest
from test_epp_rig import cand, ctx

from inferoute.epp.learned import LocalLearnedState, Placed
from inferoute.epp.scheduling.framework import (
    NoEndpoints,
    Scheduler,
    SchedulerProfile,
    WeightedScorer,
    weighted_totals,
)
from inferoute.epp.scheduling.plugins.max_score_picker import MaxScorePicker
from inferoute.epp.scheduling.plugins.prefix_cache_scorer import PrefixCacheScorer
from inferoute.epp.scheduling.types import Candidate, CycleContext


class Fixed:
    type_name: ClassVar[str] = "fixed"

    def __init__(self, name: str, scores: list[float]) -> None:
        self.name = name
        self.scores = scores

    def score(self, ctx: CycleContext, candidates: Sequence[Candidate]) -> list[float]:
        return self.scores[: len(candidates)]


class DropAll:
    type_name: ClassVar[str] = "drop-all"
    name = "drop-all"

    def filter(self, ctx: CycleContext, candidates: list[Candidate]) -> list[Candidate]:
        return []


def test_scores_are_clamped_and_weighted() -> None:
    # raw 5.0 clamps to 1, -3 to 0, NaN to 0: with weights 1 and 3, b (0 + 3*1) beats a (1 + 3*0)
    big = Fixed("big", [5.0, -3.0, float("nan")])
    second = Fixed("second", [0.0, 1.0, 0.2])
    profile = SchedulerProfile(
        "p", [], [WeightedScorer(big, 1), WeightedScorer(second, 3)], MaxScorePicker("m")
    )
    result = profile.run(ctx(), [cand("a"), cand("b"), cand("c")])
    assert [c.key for c in result.endpoints] == ["b"]
    assert result.scores == pytest.approx({"a": 1.0, "b": 3.0, "c": 0.6})


def test_weight_must_be_positive() -> None:
    with pytest.raises(ValueError, match="weight"):
        SchedulerProfile("p", [], [WeightedScorer(Fixed("f", []), 0)], MaxScorePicker("m"))


def test_every_plugin_is_timed() -> None:
    seen: list[tuple[str, str, str, float]] = []

    def observer(point: str, type_name: str, name: str):  # type: ignore[no-untyped-def]
        return lambda s: seen.append((point, type_name, name, s))

    profile = SchedulerProfile(
        "p", [], [WeightedScorer(Fixed("f", [1.0]), 1)], MaxScorePicker("m"), observer=observer
    )
    profile.run(ctx(), [cand("a")])
    assert [(p, t, n) for p, t, n, _ in seen] == [
        ("scorer", "fixed", "f"),
        ("picker", "max-score-picker", "m"),
    ]
    assert all(s >= 0 for *_, s in seen)


def test_filters_leaving_nothing_fail() -> None:
    profile = SchedulerProfile("p", [DropAll()], [], MaxScorePicker("m"))
    with pytest.raises(NoEndpoints):
        profile.run(ctx(), [cand("a")])
    with pytest.raises(NoEndpoints):
        SchedulerProfile("p", [], [], MaxScorePicker("m")).run(ctx(), [])


def test_wrong_score_count_is_a_bug_not_a_silent_pick() -> None:
    profile = SchedulerProfile("p", [], [WeightedScorer(Fixed("f", [1.0]), 1)], MaxScorePicker("m"))
    with pytest.raises(RuntimeError, match="returned 1 scores for 2"):
        profile.run(ctx(), [cand("a"), cand("b")])


def test_scheduler_learns_the_prefix_for_the_picked_endpoint() -> None:
    learned = LocalLearnedState()
    sched = Scheduler(
        [SchedulerProfile("p", [], [WeightedScorer(PrefixCacheScorer("px"), 1)], MaxScorePicker("m"))]
    )
    prompt = b"long shared prompt " * 100
    first = sched.schedule(ctx(prompt=prompt, learned=learned), [cand("a"), cand("b"), cand("c")])
    chosen = first.endpoints[0].key
    placed = [r for r in first.records if isinstance(r, Placed)]
    assert [r.endpoint for r in placed] == [chosen] and len(placed[0].keys) > 1
    assert placed[0].known == 0  # nothing was held anywhere
    assert learned.snapshot().size() == 0  # scheduling changes nothing: the records say what to learn
    learned.apply(first.records)
    for seed in range(10):  # from now on the prefix always wins
        again = sched.schedule(
            ctx(prompt=prompt, learned=learned, seed=seed), [cand("a"), cand("b"), cand("c")]
        )
        learned.apply(again.records)
        assert again.endpoints[0].key == chosen
        assert again.scores[chosen] == 1.0
        (known,) = [r for r in again.records if isinstance(r, Placed)]
        assert known.known == len(known.keys)  # every block was held there: no news for picker replicas


def test_single_profile_handler_needs_one_profile() -> None:
    with pytest.raises(ValueError):
        Scheduler([])


def test_weighted_totals_one_pass_equals_scorer_by_scorer() -> None:
    def by_scorer(weights: list[float], scores: list[list[float]], n: int) -> list[float]:
        totals = [0.0] * n  # the engine's loop before the one-pass version: the oracle
        for w, column in zip(weights, scores, strict=True):
            totals = [
                t + w * (s if 0.0 <= s <= 1.0 else (1.0 if s > 1.0 else 0.0))
                for t, s in zip(totals, column, strict=True)
            ]
        return totals

    rng = random.Random(3)
    values = [0.0, -0.0, 1.0, 0.5, -2.0, 3.0, math.nan, math.inf, -math.inf, 1, 0]
    for _ in range(300):
        k, n = rng.randint(0, 4), rng.randint(1, 6)
        weights = [rng.choice([1.0, 2.0, 0.3, 10.0]) for _ in range(k)]
        scores = [[rng.choice([*values, rng.random()]) for _ in range(n)] for _ in range(k)]
        assert repr(weighted_totals(weights, scores, n)) == repr(by_scorer(weights, scores, n))
