"""Every built-in scorer and picker: formulas (GIE's where they exist) and behaviour."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from test_epp_rig import cand, ctx

from inferoute.clock import FakeClock
from inferoute.epp.datalayer.metrics import EndpointMetrics
from inferoute.epp.learned import Capacity, Inflight, LocalLearnedState, Placed
from inferoute.epp.scheduling.plugins.kv_cache_scorer import KVCacheUtilizationScorer
from inferoute.epp.scheduling.plugins.lora_affinity_scorer import LoraAffinityScorer
from inferoute.epp.scheduling.plugins.max_score_picker import MaxScorePicker
from inferoute.epp.scheduling.plugins.predicted_ttft_scorer import PredictedTTFTScorer, TTFTModel
from inferoute.epp.scheduling.plugins.prefix_cache_scorer import PrefixCacheScorer
from inferoute.epp.scheduling.plugins.queue_scorer import QueueScorer
from inferoute.epp.scheduling.plugins.random_picker import RandomPicker
from inferoute.epp.scheduling.plugins.round_robin_picker import RoundRobinPicker
from inferoute.epp.scheduling.plugins.running_requests_scorer import RunningRequestsScorer
from inferoute.epp.scheduling.plugins.session_affinity_scorer import SessionAffinityScorer
from inferoute.epp.scheduling.plugins.weighted_random_picker import WeightedRandomPicker
from inferoute.epp.scheduling.prefix import prefix_hashes
from inferoute.epp.scheduling.types import MIN_AUTO_BLOCK_TOKENS as AUTO
from inferoute.epp.scheduling.types import Candidate, CycleContext, InferenceRequest, PrefixSettings


def test_queue_scorer_min_max() -> None:
    cs = [cand("a", waiting=0), cand("b", waiting=5), cand("c", waiting=10)]
    assert QueueScorer("q").score(ctx(), cs) == [1.0, 0.5, 0.0]
    assert QueueScorer("q").score(ctx(), [cand("a", waiting=3), cand("b", waiting=3)]) == [1.0, 1.0]


def test_queue_scorer_counts_inflight_newer_than_the_scrape() -> None:
    a, b = cand("a", waiting=1), cand("b", waiting=1)
    b.inflight = Inflight(pending=4)
    assert QueueScorer("q").score(ctx(), [a, b]) == [1.0, 0.0]
    assert QueueScorer("q", count_inflight=False).score(ctx(), [a, b]) == [1.0, 1.0]


def test_kv_cache_scorer() -> None:
    assert KVCacheUtilizationScorer("k").score(
        ctx(), [cand("a", kv_usage=0.25), cand("b", kv_usage=1.0)]
    ) == [0.75, 0.0]


def test_running_requests_scorer() -> None:
    cs = [cand("a", running=2), cand("b", running=4), cand("c", running=6)]
    assert RunningRequestsScorer("r").score(ctx(), cs) == [1.0, 0.5, 0.0]


def test_lora_affinity_tiers() -> None:
    full = dict(max_lora=2)
    cs = [
        cand("active", active_adapters=frozenset({"sql"}), **full),
        cand("room", active_adapters=frozenset({"x"}), **full),
        cand("waiting", active_adapters=frozenset({"x"}), waiting_adapters=frozenset({"sql"}), **full),
        cand("full", active_adapters=frozenset({"x", "y"}), **full),
    ]
    assert LoraAffinityScorer("l").score(ctx(model="sql"), cs) == [1.0, 0.8, 0.6, 0.0]


def test_lora_affinity_is_neutral_without_lora_servers() -> None:
    assert LoraAffinityScorer("l").score(ctx(model="base"), [cand("a"), cand("b")]) == [1.0, 1.0]


def test_prefix_cache_scorer_ratio_of_matched_blocks() -> None:
    learned = LocalLearnedState()
    prompt = b"p" * 4 * AUTO * 4  # four blocks of the auto-tuned size (no server reports one)
    h = prefix_hashes("m", prompt, block_size_tokens=AUTO)
    learned.apply([Placed("a", tuple(h), AUTO), Placed("b", tuple(h[:1]), AUTO)])
    scores = PrefixCacheScorer("p").score(
        ctx(prompt=prompt, learned=learned), [cand("a"), cand("b"), cand("c")]
    )
    assert scores == [1.0, 0.25, 0.0]
    assert PrefixCacheScorer("p").score(ctx(prompt=b""), [cand("a")]) == [0.0]


def test_prefix_block_size_auto_tunes_from_servers() -> None:
    c = ctx(prompt=b"p" * 1024)
    cs = [cand("a", block_size=64), cand("b", block_size=64), cand("c", block_size=16)]
    assert c.block_size_tokens(cs) == 64
    assert len(c.prefix_hashes(cs)) == 4  # 1024 bytes / (64 tokens x 4 chars)
    assert ctx(prompt=b"p" * 1024).block_size_tokens([cand("a", block_size=256)]) == 256


def test_prefix_block_size_before_the_servers_report_theirs() -> None:
    # autoTune's floor holds before the first scrape too: first placements are keyed as the later ones
    unreported = [cand("a"), cand("b")]
    assert ctx().block_size_tokens(unreported) == AUTO == ctx().block_size_tokens([cand("a", block_size=16)])
    fixed = CycleContext(
        InferenceRequest("m", "m", b"", 0, {}),
        LocalLearnedState().snapshot(),
        now=0.0,
        rng=random.Random(1),
        prefix_settings=PrefixSettings(block_size_tokens=16, auto_tune=False),
    )
    assert fixed.block_size_tokens([cand("a", block_size=128)]) == 16


def test_session_affinity_binds_after_pick_and_expires() -> None:
    clock = FakeClock()
    s = SessionAffinityScorer("s", clock, ttl=10)
    c = ctx(headers={"x-session-id": "u1"})
    cs = [cand("a"), cand("b")]
    assert s.score(c, cs) == [0.0, 0.0]
    s.on_picked(c, cs[1], cs)
    assert s.score(c, cs) == [0.0, 1.0]
    assert s.score(ctx(headers={"x-session-id": "u2"}), cs) == [0.0, 0.0]
    clock.advance(11)
    assert s.score(c, cs) == [0.0, 0.0]


def test_predicted_ttft_prefers_cached_prefix_over_idle_cold_endpoint() -> None:
    learned = LocalLearnedState()
    prompt = b"w" * 4000 * 4  # ~4000 tokens
    learned.apply(
        [Placed("warm", tuple(prefix_hashes("m", prompt, block_size_tokens=AUTO, max_blocks=256)), AUTO)]
    )
    warm = cand("warm", running=4)
    cold = cand("cold", running=0)
    scorer = PredictedTTFTScorer("t")
    c = ctx(prompt=prompt, learned=learned)
    t_warm, t_cold = scorer.predict(c, [warm, cold])
    assert t_warm < t_cold
    s_warm, s_cold = scorer.score(c, [warm, cold])
    assert s_warm == 1.0 and s_cold == pytest.approx(t_warm / t_cold)


def test_predicted_ttft_accounts_for_pending_prefill_and_queue() -> None:
    scorer = PredictedTTFTScorer(
        "t",
        TTFTModel(
            prefill_s_per_token=0.001, request_overhead_s=0.0, queued_request_s=0.5, decode_s_per_running=0.0
        ),
    )
    busy, queued, idle = cand("busy"), cand("queued", waiting=2), cand("idle")
    busy.inflight = Inflight(pending=1, pending_tokens=300)
    t = scorer.predict(ctx(prompt=b"x" * 400), [busy, queued, idle])
    assert t == pytest.approx([0.3 + 0.1, 1.0 + 0.1, 0.1])
    # 4 queued (scraped), 1 of them ours with 50 uncached tokens: the other 3 (another router's, or not in
    # the scrape yet) are priced like ours -- a cached prefix's short prefill, not queuedRequestSeconds each
    cached = cand("cached", waiting=4)
    cached.inflight = Inflight(pending=1, pending_tokens=50)
    assert scorer.predict(ctx(prompt=b"x" * 400), [cached]) == pytest.approx([4 * 0.05 + 0.1])


def test_predicted_ttft_kv_penalty() -> None:
    scorer = PredictedTTFTScorer("t")
    full, free = cand("full", kv_usage=0.99), cand("free", kv_usage=0.5)
    s_full, s_free = scorer.score(ctx(prompt=b"x" * 40), [full, free])
    assert s_free == 1.0 and s_full < 0.1


def _scored(*pairs: tuple[str, float]) -> tuple[list[Candidate], list[float]]:
    return [cand(k) for k, _ in pairs], [float(v) for _, v in pairs]


def test_max_score_picker_picks_the_best_and_breaks_ties_at_random() -> None:
    picker = MaxScorePicker("p")
    assert [c.key for c in picker.pick(ctx(), *_scored(("a", 1), ("b", 3), ("c", 2)))] == ["b"]
    wins = Counter(
        picker.pick(ctx(seed=s), *_scored(("a", 2), ("b", 2), ("c", 1)))[0].key for s in range(200)
    )
    assert set(wins) == {"a", "b"} and min(wins.values()) > 50


def test_max_score_picker_fallback_list_is_ordered() -> None:
    picker = MaxScorePicker("p", max_endpoints=3)
    got = picker.pick(ctx(), *_scored(("a", 1), ("b", 3), ("c", 2), ("d", 0)))
    assert [c.key for c in got] == ["b", "c", "a"]


def test_random_picker_is_uniform_and_distinct() -> None:
    picker = RandomPicker("r", max_endpoints=2)
    rng_ctx = ctx()
    counts: Counter[str] = Counter()
    for _ in range(600):
        got = picker.pick(rng_ctx, *_scored(("a", 0), ("b", 5), ("c", 9)))
        assert len({c.key for c in got}) == 2
        counts[got[0].key] += 1
    assert min(counts.values()) > 120


def test_weighted_random_picker_follows_scores() -> None:
    picker = WeightedRandomPicker("w")
    c = ctx()
    counts = Counter(picker.pick(c, *_scored(("a", 3), ("b", 1), ("z", 0)))[0].key for _ in range(2000))
    assert counts["z"] == 0
    assert 0.65 < counts["a"] / 2000 < 0.85  # expected 0.75
    everyone_zero = Counter(picker.pick(c, *_scored(("a", 0), ("b", 0)))[0].key for _ in range(400))
    assert min(everyone_zero.values()) > 120


def test_round_robin_picker_cycles_in_key_order() -> None:
    picker = RoundRobinPicker("rr", max_endpoints=2)
    seq = [[c.key for c in picker.pick(ctx(), *_scored(("b", 0), ("a", 9), ("c", 1)))] for _ in range(4)]
    assert seq == [["a", "b"], ["b", "c"], ["c", "a"], ["a", "b"]]


def test_pickers_are_reproducible_with_a_seed() -> None:
    def run(seed: int) -> list[str]:
        c = ctx()
        c.rng = random.Random(seed)
        return [
            WeightedRandomPicker("w").pick(c, *_scored(("a", 1), ("b", 1), ("c", 1)))[0].key
            for _ in range(20)
        ]

    assert run(3) == run(3)


def test_predicted_ttft_prices_adapter_loading() -> None:
    scorer = PredictedTTFTScorer("t")
    lora = dict(max_lora=2)
    running = cand("running", active_adapters=frozenset({"sql"}), **lora)
    free_slot = cand("free", active_adapters=frozenset({"x"}), **lora)
    full = cand("full", active_adapters=frozenset({"x", "y"}), **lora)
    t_run, t_free, t_full = scorer.predict(ctx(model="sql", prompt=b"q" * 40), [running, free_slot, full])
    assert t_run < t_free < t_full
    assert t_free - t_run == pytest.approx(0.05) and t_full - t_run == pytest.approx(0.7)
    # a base-model request (no candidate runs it as an adapter) is not charged for adapters
    base = scorer.predict(ctx(model="base", prompt=b"q" * 40), [running, free_slot, full])
    assert base[0] == pytest.approx(base[1]) == pytest.approx(base[2])


def test_auto_tuned_block_size_has_a_floor() -> None:
    cs = [cand("a", block_size=16), cand("b", block_size=16)]
    assert ctx(prompt=b"p" * 1024).block_size_tokens(cs) == 64  # not 16: bounded index size and hashing


def test_predicted_ttft_remembers_where_it_sent_an_adapter() -> None:
    scorer = PredictedTTFTScorer("t")
    lora = dict(max_lora=2)
    elsewhere = cand("elsewhere", active_adapters=frozenset({"sql"}), **lora)  # evidence "sql" is an adapter
    a, b = cand("a", **lora), cand("b", **lora)
    c = ctx(model="sql", prompt=b"q" * 40)
    t_a, t_b = scorer.predict(c, [a, b, elsewhere])[:2]
    assert t_a == pytest.approx(t_b)  # both would load it
    scorer.on_picked(c, b, [a, b, elsewhere])
    t_a, t_b = scorer.predict(c, [a, b, elsewhere])[:2]
    assert t_b == pytest.approx(t_a - 0.05)  # b probably still has it loaded


def test_predicted_ttft_decides_adapter_or_not_once_per_cycle() -> None:
    # the answer is kept for on_picked of the same cycle (same candidate list), and only for it
    scorer = PredictedTTFTScorer("t")
    lora = dict(max_lora=2)
    a, b = cand("a", **lora), cand("b", **lora)
    c = ctx(model="sql", prompt=b"q" * 40)
    cands = [a, b]
    scorer.predict(c, cands)  # nobody reports "sql": a base model
    b.metrics = EndpointMetrics(active_adapters=frozenset({"sql"}), max_lora=2)  # a scrape lands later
    scorer.on_picked(c, a, cands)
    assert scorer._sent == {}  # the cycle was scored as a base-model request
    t_a, t_b = scorer.predict(c, cands)  # a new cycle sees the new scrape
    assert t_a == pytest.approx(t_b + 0.05)
    scorer.on_picked(c, a, cands)
    assert list(scorer._sent) == ["a"]


def test_predicted_ttft_prices_the_evictions_a_miss_causes_on_a_full_cache() -> None:
    learned = LocalLearnedState()
    prompt = b"d" * 2000 * 4  # ~2000 tokens
    keys = tuple(prefix_hashes("m", prompt, block_size_tokens=AUTO))
    kv = {"num_gpu_blocks": 1000, "block_size": 16}  # 16,000 tokens of KV cache each
    learned.apply([Capacity(ep, 16_000) for ep in ("warm", "full", "roomy")])
    learned.apply([Placed("warm", keys, AUTO)])
    learned.apply([Placed("full", tuple(range(1, 251)), AUTO)])  # 250 x 64 = 16,000 tokens: full
    learned.apply([Placed("roomy", tuple(range(1000, 1100)), AUTO)])  # 6,400: room for this prompt
    cs = [cand("warm", **kv), cand("full", **kv), cand("roomy", **kv), cand("unreported")]
    scorer = PredictedTTFTScorer("t")
    c = ctx(prompt=prompt, learned=learned)
    _, t_full, t_roomy, t_unreported = scorer.predict(c, cs)
    assert t_full == t_roomy == t_unreported  # the same TTFT: nothing of the prompt cached on these three
    evict = scorer.eviction_cost(c, cs)
    assert evict[0] == evict[2] == evict[3] == 0.0  # cached; room left; capacity unknown
    assert evict[1] == pytest.approx(c.request.prompt_tokens * TTFTModel().prefill_s_per_token)
    s_warm, s_full, s_roomy, _ = scorer.score(c, cs)
    assert s_warm == 1.0 and s_full < s_roomy
    assert s_full == pytest.approx(t_roomy / (t_full + evict[1]) * s_roomy)
    plain = PredictedTTFTScorer("t", TTFTModel(eviction_weight=0.0))
    assert plain.eviction_cost(c, cs) == [0.0] * 4
    assert plain.score(c, cs)[1] == plain.score(c, cs)[2]
    slo = ctx(prompt=prompt, learned=learned)
    slo.request.slo_ttft = 10.0  # an SLO is about this request's TTFT: evictions do not count against it
    assert scorer.score(slo, cs)[1] == scorer.score(slo, cs)[2]
