"""The director: every rejection path, subset hints, admission, rewrite, fallbacks and response accounting."""

from __future__ import annotations

import json

import pytest
from test_epp_rig import Rig, body, pick_request

from inferoute.endpoints import Endpoint
from inferoute.epp.requestcontrol.director import Session
from inferoute.epp.requestcontrol.parse import ParsedBody
from inferoute.errors import InferouteError
from inferoute.picking import Destination, Reject


def decide(rig: Rig, b: bytes, **kw: object) -> Destination:
    decision, _ = rig.director.decide(pick_request(b, **kw))  # type: ignore[arg-type]
    assert isinstance(decision, Destination), decision
    return decision


def reject(rig: Rig, b: bytes, **kw: object) -> Reject:
    decision, session = rig.director.decide(pick_request(b, **kw))  # type: ignore[arg-type]
    assert isinstance(decision, Reject), decision
    session.response_finished()  # a data plane ends every session, even after a Reject
    err = json.loads(decision.body)["error"]
    assert err["code"] == decision.status and err["message"] and err["type"]
    assert (
        rig.value(
            "inference_objective_request_error_total",
            {
                "model_name": json.loads(b).get("model", "") if b.startswith(b"{") else "",
                "target_model_name": json.loads(b).get("model", "") if b.startswith(b"{") else "",
                "error_code": str(decision.status),
            },
        )
        >= 1
    )
    return decision


@pytest.mark.parametrize("b", [b"not json", b"[1,2]", b'{"prompt": "x"}', b'{"model": 3}', b'{"model": ""}'])
def test_bad_bodies_are_400(b: bytes) -> None:
    rig = Rig()
    decision, _ = rig.director.decide(pick_request(b))
    assert isinstance(decision, Reject) and decision.status == 400
    assert json.loads(decision.body)["error"]["type"] == "invalid_request_error"


def test_a_parse_handed_on_by_the_data_plane_is_used_instead_of_parsing_again() -> None:
    rig = Rig()
    b = body("in-the-body")
    request = pick_request(b)
    request.parsed = ParsedBody("handed-on", memoryview(b"[]"), False)
    decision, _ = rig.director.decide(request)
    assert isinstance(decision, Destination)
    labels = {"model_name": "handed-on", "target_model_name": "handed-on"}
    assert rig.value("inference_objective_request_total", labels) == 1
    request.parsed = InferouteError(
        400, "model not found in request body", cause="bad-request", param="model"
    )
    decision, _ = rig.director.decide(request)
    assert isinstance(decision, Reject) and decision.status == 400
    assert json.loads(decision.body)["error"]["message"] == "model not found in request body"


def test_subset_hint_by_ip_and_ip_port() -> None:
    rig = Rig(3)
    for _ in range(10):
        assert decide(rig, body(), subset=["10.0.0.2"]).endpoints == ("10.0.0.2:8000",)
        assert decide(rig, body(), subset=["10.0.0.9:1", "10.0.0.3:8000"]).endpoints == ("10.0.0.3:8000",)


@pytest.mark.parametrize("subset", [[], ["10.9.9.9"], ["10.0.0.1:9999"], [""]])
def test_empty_or_unmatched_subset_is_503(subset: list[str]) -> None:
    assert reject(Rig(3), body(), subset=subset).status == 503


def test_no_endpoints_is_503() -> None:
    rig = Rig(0)
    assert reject(rig, body()).status == 503


def test_stale_endpoints_are_excluded_while_others_are_fresh() -> None:
    rig = Rig(3)
    rig.clock.advance(5)  # everything stale ...
    rig.scrape("10.0.0.2:8000")  # ... except pod-1
    for _ in range(10):
        assert decide(rig, body()).endpoints == ("10.0.0.2:8000",)


def test_all_stale_schedules_blind_and_counts_it() -> None:
    rig = Rig(2)
    rig.clock.advance(5)
    assert decide(rig, body()).endpoints[0] in {"10.0.0.1:8000", "10.0.0.2:8000"}
    assert rig.value("inferoute_epp_stale_fallback_total") == 1


def test_sheddable_request_is_429_only_while_saturated() -> None:
    rig = Rig(2, objectives={"batch": -1, "chat": 10})
    shed = {"x-gateway-inference-objective": "batch"}
    assert decide(rig, body(), headers=shed)  # idle pool: admitted
    for ep in rig.endpoints:
        rig.scrape(ep.key, waiting=50)
    assert reject(rig, body(), headers=shed).status == 429
    assert decide(rig, body(), headers={"x-gateway-inference-objective": "chat"})  # not sheddable
    assert decide(rig, body())  # no objective: priority 0


def test_model_rewrite_header_rewrites_the_body() -> None:
    rig = Rig()
    d = decide(rig, body(model="alias", prompt="p"), headers={"x-gateway-model-name-rewrite": "real-model"})
    assert d.body is not None and json.loads(d.body) == {"model": "real-model", "prompt": "p"}
    assert d.set_headers["x-gateway-model-name"] == "real-model"
    assert (
        rig.value(
            "inference_extension_model_rewrite_decisions_total",
            {"model_name": "alias", "target_model": "real-model"},
        )
        == 1
    )
    assert decide(rig, body()).body is None


def test_control_headers_are_carried_on_the_request() -> None:
    rig = Rig(objectives={"premium": 5})
    seen = []

    class Spy:
        type_name = "spy"
        name = "spy"

        def score(self, ctx, candidates):  # type: ignore[no-untyped-def]
            seen.append(ctx.request)
            return [1.0] * len(candidates)

    from inferoute.epp.scheduling.framework import Scheduler, SchedulerProfile, WeightedScorer
    from inferoute.epp.scheduling.plugins.max_score_picker import MaxScorePicker

    profile = SchedulerProfile("spy", [], [WeightedScorer(Spy(), 1)], MaxScorePicker("m"))  # type: ignore[arg-type]
    rig.director.scheduler = Scheduler([profile])
    decide(
        rig,
        body(model="m"),
        headers={
            "x-gateway-inference-objective": "premium",
            "x-gateway-inference-fairness-id": "tenant-a",
            "x-gateway-model-name-rewrite": "m2",
        },
    )
    req = seen[-1]
    assert (req.objective, req.priority, req.fairness_id, req.model, req.target_model) == (
        "premium",
        5,
        "tenant-a",
        "m",
        "m2",
    )
    decide(rig, body())
    assert seen[-1].fairness_id == "default-flow" and seen[-1].priority == 0


def test_fallback_list_with_max_num_of_endpoints() -> None:
    rig = Rig(
        4, "plugins: [{type: queue-scorer}, {type: max-score-picker, parameters: {maxNumOfEndpoints: 3}}]"
    )
    for i, ep in enumerate(rig.endpoints):
        rig.scrape(ep.key, waiting=i)
    assert decide(rig, body()).endpoints == ("10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000")


def test_same_prompt_keeps_landing_on_the_same_endpoint() -> None:
    rig = Rig(5)
    prompt = "You are a helpful assistant. " * 200
    first = decide(rig, body(prompt=prompt)).endpoints[0]
    for _ in range(20):
        d, s = rig.director.decide(pick_request(body(prompt=prompt)))
        assert isinstance(d, Destination) and d.endpoints[0] == first
        s.response_finished()
    assert rig.value("inference_extension_prefix_indexer_size") > 0


def test_inflight_counts_follow_the_session() -> None:
    rig = Rig(2, "plugins: [{type: round-robin-picker}]")
    d, s = rig.director.decide(pick_request(body(prompt="x" * 400)))
    assert isinstance(d, Destination) and isinstance(s, Session)
    key = d.endpoints[0]
    c = rig.learned.snapshot().inflight(key)
    assert (c.requests, c.pending, c.pending_tokens) == (
        1,
        1,
        101,
    )  # JSON string incl. quotes: ceil(402 B / 4)
    s.response_started(key, 200, {"content-type": "text/event-stream"})
    s.response_chunk(b'data: {"choices":[{"text":"a"}]}\n\n')
    assert (c.requests, c.pending, c.pending_tokens) == (1, 1, 101)  # a view never changes
    c = rig.learned.snapshot().inflight(key)
    assert (c.requests, c.pending, c.pending_tokens) == (1, 0, 0)
    s.response_chunk(
        b'data: {"choices":[],"usage":{"prompt_tokens":100,"completion_tokens":7,'
        b'"prompt_tokens_details":{"cached_tokens":64}}}\n\ndata: [DONE]\n\n'
    )
    s.response_finished()
    s.aborted("late")  # ignored: the session already ended
    assert rig.learned.snapshot().inflight(key).requests == 0
    assert s.usage is not None and (
        s.usage.prompt_tokens,
        s.usage.completion_tokens,
        s.usage.cached_tokens,
    ) == (100, 7, 64)
    assert (
        rig.value("inference_objective_output_tokens_sum", {"model_name": "m", "target_model_name": "m"}) == 7
    )
    assert rig.value("inference_objective_running_requests", {"model_name": "m"}) == 0


def test_served_fallback_moves_the_inflight_count() -> None:
    rig = Rig(2, "plugins: [{type: round-robin-picker, parameters: {maxNumOfEndpoints: 2}}]")
    d, s = rig.director.decide(pick_request(body()))
    assert isinstance(d, Destination)
    primary, fallback = d.endpoints
    s.response_started(fallback, 200, {})
    assert (
        rig.learned.snapshot().inflight(primary).requests == 0
        and rig.learned.snapshot().inflight(fallback).requests == 1
    )
    s.aborted("client-disconnect")
    assert rig.learned.snapshot().inflight(fallback).requests == 0


def test_bodyless_get_goes_to_one_of_the_pool_endpoints() -> None:
    rig = Rig(3)
    from inferoute.picking import PickRequest

    d, _ = rig.director.decide(PickRequest("GET", "/v1/models", {}, b""))
    assert isinstance(d, Destination) and len(d.endpoints) == 1
    assert d.endpoints[0] in {ep.key for ep in rig.endpoints}


def test_scheduling_metrics_are_recorded() -> None:
    rig = Rig(3)
    decide(rig, body())
    assert rig.value("inference_objective_request_total", {"model_name": "m", "target_model_name": "m"}) == 1
    assert rig.value("inference_extension_scheduler_e2e_duration_seconds_count") == 1
    assert (
        rig.value(
            "inference_extension_plugin_duration_seconds_count",
            {"extension_point": "scorer", "plugin_type": "queue-scorer", "plugin_name": "queue-scorer"},
        )
        == 1
    )
    assert rig.value("inference_extension_prefix_indexer_hit_ratio_count") == 1


def test_pending_prefill_counts_only_the_uncached_part() -> None:
    rig = Rig(3)
    prompt = "shared system prompt " * 400  # ~8 KB: 32 blocks of 64 tokens (256 bytes)
    d1, s1 = rig.director.decide(pick_request(body(prompt=prompt)))
    assert isinstance(d1, Destination) and isinstance(s1, Session)
    warm = d1.endpoints[0]
    assert s1.prefill_tokens == s1.prompt_tokens  # nothing cached anywhere yet
    s1.response_finished()
    d2, s2 = rig.director.decide(pick_request(body(prompt=prompt + " and a question")))
    assert isinstance(d2, Destination) and isinstance(s2, Session) and d2.endpoints[0] == warm
    assert 0 < s2.prefill_tokens < s2.prompt_tokens // 10  # most of it is in warm's cache
    assert rig.learned.snapshot().inflight(warm).pending_tokens == s2.prefill_tokens
    s2.response_chunk(b"data: {}\n\n")
    assert rig.learned.snapshot().inflight(warm).pending_tokens == 0
    s2.response_finished()


def test_model_label_cardinality_is_capped() -> None:
    rig = Rig(2)
    rig.metrics.MAX_MODEL_SERIES = 3
    for i in range(6):
        decide(rig, body(model=f"m{i}"))
    assert (
        rig.value("inference_objective_request_total", {"model_name": "m2", "target_model_name": "m2"}) == 1
    )
    assert (
        rig.value("inference_objective_request_total", {"model_name": "m3", "target_model_name": "m3"}) == 0
    )
    assert (
        rig.value("inference_objective_request_total", {"model_name": "other", "target_model_name": "other"})
        == 3
    )


def test_reused_pool_follows_scrapes_staleness_and_endpoint_changes() -> None:
    """The director reuses the pool's candidate list between picks; it must still see every new snapshot,
    drop endpoints that went stale, take back recovered ones and follow endpoint-set changes."""
    rig = Rig(2, "plugins:\n- type: queue-scorer\n- type: max-score-picker\n")
    a, b = (ep.key for ep in rig.endpoints)
    rig.scrape(a, waiting=0)
    rig.scrape(b, waiting=5)
    assert decide(rig, body()).endpoints == (a,)
    rig.scrape(a, waiting=9)  # new snapshot between picks
    assert decide(rig, body()).endpoints == (b,)
    rig.clock.advance(1.5)
    rig.scrape(a, waiting=0)  # b's last good scrape is now 1.5 s old, still fresh
    rig.scrape(b, waiting=5)
    rig.clock.advance(1.0)
    rig.scrape(b, waiting=5)
    rig.clock.advance(1.5)  # a: 2.5 s since its last good scrape (stale), b: 1.5 s
    assert decide(rig, body()).endpoints == (b,)
    rig.scrape(a, waiting=0)  # a recovers
    assert decide(rig, body()).endpoints == (a,)
    c = Endpoint("pod-new", "10.0.0.99", 8000)
    rig.datastore.set_endpoints([*rig.endpoints, c])
    rig.scrape(c.key, waiting=0)
    rig.scrape(a, waiting=3)
    assert decide(rig, body()).endpoints == (c.key,)
    relabelled = Endpoint("pod-new", "10.0.0.99", 8000, {"tier": "x"})  # same key, new state object
    rig.datastore.set_endpoints([*rig.endpoints, relabelled])
    rig.scrape(relabelled.key, waiting=0)
    assert decide(rig, body()).endpoints == (relabelled.key,)


def test_yaml_objectives_and_weighted_rewrites_with_current_headers() -> None:
    config = """
plugins: [{type: queue-scorer}]
objectives: [{name: chat, priority: 10}, {name: batch, priority: -1}]
modelRewrites:
- name: split
  rules:
  - matches: [{model: {type: Exact, value: food}}]
    targets: [{modelRewrite: food-v1, weight: 70}, {modelRewrite: food-v2, weight: 30}]
"""
    rig = Rig(2, config)
    targets = []
    for _ in range(400):
        d = decide(rig, body(model="food"))
        assert d.body is not None
        targets.append(json.loads(d.body)["model"])
    assert 0.62 < targets.count("food-v1") / 400 < 0.78
    # the x-llm-d-* header beats its x-gateway-* alias and the YAML rule
    d = decide(
        rig,
        body(model="food"),
        headers={"x-llm-d-model-name-rewrite": "pinned", "x-gateway-model-name-rewrite": "old"},
    )
    assert d.body is not None and json.loads(d.body)["model"] == "pinned"
    for ep in rig.endpoints:
        rig.scrape(ep.key, waiting=50)
    assert reject(rig, body(), headers={"x-llm-d-inference-objective": "batch"}).status == 429
    assert decide(rig, body(), headers={"x-llm-d-inference-objective": "chat"})


def test_shadow_profile_never_changes_the_decision_and_reports_agreement() -> None:
    from prometheus_client import CollectorRegistry

    from inferoute.epp.scheduling.shadow import ShadowMetrics

    config = """
plugins: [{type: queue-scorer}, {type: random-picker}, {type: max-score-picker}]
schedulingProfiles:
- name: live
  plugins: [{pluginRef: queue-scorer}, {pluginRef: max-score-picker}]
- name: shadow
  plugins: [{pluginRef: queue-scorer}, {pluginRef: random-picker}]
"""
    rig = Rig(3, config)
    registry = CollectorRegistry()
    ShadowMetrics(registry).attach(rig.director.scheduler)
    rig.scrape("10.0.0.1:8000", waiting=9)
    rig.scrape("10.0.0.2:8000", waiting=0)
    rig.scrape("10.0.0.3:8000", waiting=9)
    for _ in range(60):
        d, s = rig.director.decide(pick_request(body()))
        assert isinstance(d, Destination) and d.endpoints[0] == "10.0.0.2:8000"  # live: least queue
        s.response_finished()

    def v(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    agree = v("inferoute_epp_shadow_decisions_total", profile="shadow", outcome="agree")
    disagree = v("inferoute_epp_shadow_decisions_total", profile="shadow", outcome="disagree")
    assert agree + disagree == 60 and 0 < agree < 60  # random: agrees about a third of the time
    picks = [
        v("inferoute_epp_shadow_picks_total", profile="shadow", endpoint=f"10.0.0.{i}:8000")
        for i in (1, 2, 3)
    ]
    assert sum(picks) == 60 and all(p > 0 for p in picks)
    assert v("inferoute_epp_shadow_duration_seconds_count", profile="shadow") == 60


def test_a_failing_shadow_is_counted_not_raised() -> None:
    from prometheus_client import CollectorRegistry

    from inferoute.epp.scheduling.shadow import ShadowMetrics

    config = """
plugins: [{type: queue-scorer}, {type: lora-affinity-scorer}]
schedulingProfiles:
- {name: live, plugins: [{pluginRef: queue-scorer}]}
- {name: shadow-broken, plugins: [{pluginRef: lora-affinity-scorer}]}
"""
    rig = Rig(2, config)
    registry = CollectorRegistry()
    ShadowMetrics(registry).attach(rig.director.scheduler)
    shadow = rig.director.scheduler.shadows[0]

    def boom(*_: object) -> list[float]:
        raise RuntimeError("bug in the new algorithm")

    shadow.scorers[0].scorer.score = boom  # type: ignore[method-assign]
    assert decide(rig, body()).endpoints
    assert (
        registry.get_sample_value(
            "inferoute_epp_shadow_decisions_total", {"profile": "shadow-broken", "outcome": "error"}
        )
        == 1
    )


SLO_CONFIG = """
plugins:
- type: predicted-ttft-scorer
- type: latency-slo-admitter
objectives: {batch: -1}
"""


def test_slo_headroom_prefers_endpoints_that_meet_the_objective() -> None:
    from test_epp_rig import cand, ctx

    from inferoute.epp.scheduling.plugins.predicted_ttft_scorer import PredictedTTFTScorer

    fast, mid, slow = cand("fast"), cand("mid", waiting=3), cand("slow", waiting=20)
    least, most = PredictedTTFTScorer("p"), PredictedTTFTScorer("p", strategy="most")
    c = ctx(headers={})
    predicted = least.predict(c, [fast, mid, slow])
    assert predicted[0] < predicted[1] < 0.5 < predicted[2]
    c.request.slo_ttft = 0.5  # fast and mid meet it, slow does not
    s = least.score(c, [fast, mid, slow])
    assert s[2] == 0.0 and s[1] == 1.0 and 0 < s[0] < 1  # bin-pack: the least headroom that still meets it
    s = most.score(c, [fast, mid, slow])
    assert s[2] == 0.0 and s[0] == 1.0 and 0 < s[1] < 1
    c.request.slo_ttft = 0.001  # nobody meets it: the fastest (smallest violation) wins
    assert least.score(c, [fast, mid, slow])[0] == 1.0


def test_slo_admitter_sheds_sheddable_requests_no_endpoint_can_serve_in_time() -> None:
    rig = Rig(2, SLO_CONFIG)
    for ep in rig.endpoints:
        rig.scrape(ep.key, waiting=3, running=60, kv_usage=0.5)  # under the saturation thresholds
    tight = {"x-llm-d-inference-objective": "batch", "x-llm-d-slo-ttft-ms": "200"}
    r = reject(rig, body(), headers=tight)
    assert r.status == 429 and b"TTFT objective" in r.body
    assert decide(rig, body(), headers={**tight, "x-llm-d-slo-ttft-ms": "60000"})  # a loose SLO is met
    assert decide(rig, body(), headers={"x-slo-ttft-ms": "200"})  # not sheddable: admitted
    assert decide(rig, body(), headers={"x-llm-d-inference-objective": "batch"})  # no SLO: admitted
    rig.scrape(rig.endpoints[0].key, waiting=0, running=0, kv_usage=0.5)  # an idle endpoint appears
    # the other still queues 3, priced like the 3 short requests this picker has pending there (~0.03 s
    # each, not queuedRequestSeconds): ~0.13 s, so a 100 ms objective fits only the idle one
    tighter = {**tight, "x-llm-d-slo-ttft-ms": "100"}
    assert decide(rig, body(), headers=tighter).endpoints[0] == rig.endpoints[0].key
