"""Flow control's pure parts: detectors, usage limits, fairness and ordering policies, the controller.

Every test drives time by hand (no sleeps). The contract suite at the end runs every fairness policy with
every ordering policy through the same invariants.
"""

from __future__ import annotations

import itertools
import random

import pytest

from inferoute.epp.datalayer.metrics import EndpointMetrics
from inferoute.epp.flowcontrol.concurrency_detector import ConcurrencyDetector
from inferoute.epp.flowcontrol.config import (
    BandConfig,
    FlowControlConfig,
    gate_enabled,
    parse_flow_control,
)
from inferoute.epp.flowcontrol.controller import FlowController
from inferoute.epp.flowcontrol.edf_ordering import EdfOrdering
from inferoute.epp.flowcontrol.fcfs_ordering import FcfsOrdering
from inferoute.epp.flowcontrol.global_strict_fairness import GlobalStrictFairness
from inferoute.epp.flowcontrol.outcomes import translate
from inferoute.epp.flowcontrol.priority_holdback import PriorityHoldback
from inferoute.epp.flowcontrol.program_aware_fairness import ProgramAwareFairness
from inferoute.epp.flowcontrol.round_robin_fairness import RoundRobinFairness
from inferoute.epp.flowcontrol.signals import recommended_replicas
from inferoute.epp.flowcontrol.slo_deadline_ordering import SloDeadlineOrdering
from inferoute.epp.flowcontrol.soft_reflective_ceiling import SoftReflectiveCeiling
from inferoute.epp.flowcontrol.static_usage_limit import StaticUsageLimit
from inferoute.epp.flowcontrol.types import Flow, FlowItem, Outcome
from inferoute.epp.flowcontrol.units import duration, quantity
from inferoute.epp.flowcontrol.utilization_detector import UtilizationDetector
from inferoute.epp.learned import Inflight
from inferoute.epp.scheduling.types import Candidate
from inferoute.errors import InferouteError

NOW = 100.0


def ep(
    waiting: float = 0, kv: float = 0.0, scraped: float = NOW, inflight: int = 0, tokens: int = 0
) -> Candidate:
    counts = Inflight(requests=inflight, tokens=tokens)
    return Candidate("k", "k", EndpointMetrics(waiting=waiting, kv_usage=kv, scraped_at=scraped), counts)


def item(fid: str = "f", prio: int = 0, size: int = 10, at: float = NOW, **kw: object) -> FlowItem:
    return FlowItem(fid, prio, size, at, **kw)  # type: ignore[arg-type]


def controller(
    fairness: object = None, ordering: object = None, usage: object = None, **cfg: object
) -> FlowController:
    band = BandConfig(0, fairness=fairness or GlobalStrictFairness(), ordering=ordering or FcfsOrdering())  # type: ignore[arg-type]
    config = FlowControlConfig(UtilizationDetector(), usage or StaticUsageLimit(), band, **cfg)  # type: ignore[arg-type]
    return FlowController(config)


def drain(c: FlowController, saturation: float = 0.0, now: float = NOW) -> list[FlowItem]:
    out = []
    while (it := c.dispatch_one(now, saturation)) is not None:
        out.append(it)
    return out


# -- saturation detectors ---------------------------------------------------------------------------------
def test_utilization_is_the_mean_of_each_endpoints_worst_ratio() -> None:
    d = UtilizationDetector(queue_depth_threshold=5, kv_cache_util_threshold=0.8)
    assert d.saturation([ep(), ep()], NOW) == 0.0
    assert d.saturation([ep(), ep(waiting=5)], NOW) == 0.5
    assert d.saturation([ep(waiting=10), ep(kv=0.4)], NOW) == pytest.approx((2.0 + 0.5) / 2)  # not clamped
    assert d.saturation([], NOW) == 1.0


def test_utilization_fails_closed_on_stale_metrics() -> None:
    d = UtilizationDetector(staleness=0.2)
    assert d.saturation([ep(scraped=NOW - 0.1)], NOW) == 0.0
    assert d.saturation([ep(scraped=NOW - 0.3), ep()], NOW) == 0.5
    assert d.stale_endpoints == 1
    assert d.saturation([ep(scraped=0.0)], NOW) == 1.0  # never scraped


def test_utilization_as_a_filter_keeps_all_when_all_would_go() -> None:
    d = UtilizationDetector(queue_depth_threshold=5, kv_cache_util_threshold=0.8, headroom=0.2)
    a, b = ep(waiting=6), ep(waiting=7)
    assert d.filter([a, b]) == [a]  # limit 5 * 1.2 = 6
    c = ep(waiting=9)
    assert d.filter([b, c]) == [b, c]


def test_concurrency_detector_modes() -> None:
    pool = [ep(inflight=50, tokens=100), ep(inflight=0, tokens=900)]
    assert ConcurrencyDetector("requests", 100).saturation(pool, NOW) == 0.25
    assert ConcurrencyDetector("tokens", 100, 1000).saturation(pool, NOW) == 0.5
    assert ConcurrencyDetector("hybrid", 100, 1000).saturation(pool, NOW) == pytest.approx((0.5 + 0.9) / 2)
    assert ConcurrencyDetector("requests", 100, headroom=1.0).saturation(pool, NOW) == 0.125
    assert ConcurrencyDetector().saturation([], NOW) == 1.0


# -- usage limits -----------------------------------------------------------------------------------------
def test_usage_limits() -> None:
    assert StaticUsageLimit(0.7).ceilings([5, 0, -1], 0.3) == [0.7, 0.7, 0.7]
    assert PriorityHoldback(0.4).ceilings([5, 0, -1], 0.0) == pytest.approx([1.0, 0.7, 0.4])
    assert PriorityHoldback(0.4, domain="value").ceilings([10, 0, -10], 0.0) == pytest.approx([1.0, 0.7, 0.4])
    assert PriorityHoldback(0.4, domain="value").ceilings([10, 8, 0], 0.0) == pytest.approx([1.0, 0.88, 0.4])
    assert PriorityHoldback(0.4).ceilings([3], 0.9) == [1.0]
    with pytest.raises(ValueError):
        PriorityHoldback(0.0)


def test_soft_reflective_ceiling_reflects_and_alternates() -> None:
    p = SoftReflectiveCeiling()
    assert p.ceilings([1, 0], 0.0) == [1.0, 1.0]
    # sat 0.75: ceilings [1, 0.25]; the low band is closed 3 beats (round(0.75/0.25)) and open 1
    opened = []
    for _ in range(8):
        c = p.ceilings([1, 0], 0.75)
        assert c[0] == 1.0
        opened.append(c[1] > 0.75)
    assert opened.count(True) == 2 and opened.count(False) == 6
    assert all(c <= 0.9 for c in p.ceilings([1, 0], 1.0)[1:])


# -- ordering ---------------------------------------------------------------------------------------------
def test_orderings() -> None:
    early, late = item(at=1.0), item(at=2.0)
    assert FcfsOrdering().key(early) < FcfsOrdering().key(late)
    short_ttl, long_ttl, none = item(at=2.0, ttl=1.0), item(at=1.0, ttl=5.0), item(at=0.0)
    edf = EdfOrdering()
    assert edf.key(short_ttl) < edf.key(long_ttl) < edf.key(none)
    slo = SloDeadlineOrdering()
    tight, loose, missing = item(at=2.0, slo_ttft=0.1), item(at=1.0, slo_ttft=5.0), item(at=0.0)
    assert slo.key(tight) < slo.key(loose) < slo.key(missing)


# -- fairness ---------------------------------------------------------------------------------------------
def _flows(*specs: tuple[str, list[float]]) -> list[Flow]:
    out = []
    for key, times in specs:
        f = Flow(key, FcfsOrdering())
        for t in times:
            f.push(item(key, at=t))
        out.append(f)
    return out


def test_global_strict_picks_the_best_head() -> None:
    flows = _flows(("a", [5.0]), ("b", [1.0]), ("c", [3.0]))
    assert GlobalStrictFairness().pick_flow(0, flows, NOW).key == "b"


def test_round_robin_rotates_over_sorted_keys_per_band() -> None:
    rr = RoundRobinFairness()
    flows = _flows(("b", [1.0]), ("a", [2.0]), ("c", [3.0]))
    assert [rr.pick_flow(0, flows, NOW).key for _ in range(4)] == ["a", "b", "c", "a"]
    assert rr.pick_flow(1, flows, NOW).key == "a"  # another band has its own cursor
    assert rr.pick_flow(0, flows[:1], NOW).key == "b"  # a departed flow is skipped


def test_program_aware_prefers_least_attained_service_with_decay() -> None:
    las = ProgramAwareFairness(half_life=60)
    las.record("heavy", 1000, 500, now=0.0)  # service 2000
    las.record("light", 10, 5, now=0.0)
    flows = _flows(("heavy", [50.0]), ("light", [50.0]))
    assert las.pick_flow(0, flows, 60.0).key == "light"
    assert las.service("heavy", 60.0) == pytest.approx(1000.0)  # one half-life later
    # a long-waiting head can beat lower service
    flows = _flows(("heavy", [0.0]), ("light", [59.9]))
    las2 = ProgramAwareFairness(weight_service=0.1, weight_head_wait=0.9)
    las2.record("heavy", 10, 0, now=0.0)
    las2.record("light", 5, 0, now=0.0)
    assert las2.pick_flow(0, flows, 60.0).key == "heavy"
    assert 0 < las.jains_index(0.0) < 1.0


# -- the controller ---------------------------------------------------------------------------------------
def test_strict_priority_starves_lower_bands() -> None:
    c = controller()
    for i in range(3):
        c.enqueue(item("low", -1, at=i), pool_empty=False)
    c.enqueue(item("high", 5, at=10), pool_empty=False)
    order = drain(c)
    assert [i.priority for i in order] == [5, -1, -1, -1]


def test_head_of_line_saturation_blocks_every_band() -> None:
    c = controller(usage=PriorityHoldback(0.5))
    c.enqueue(item("hi", 5), pool_empty=False)
    c.enqueue(item("lo", 0), pool_empty=False)
    assert c.dispatch_one(NOW, 1.0) is None  # both gated
    got = c.dispatch_one(NOW, 0.7)  # high band ceiling 1.0, low band 0.5
    assert got is not None and got.priority == 5
    assert c.dispatch_one(NOW, 0.7) is None  # low band gated at 0.7 >= 0.5
    assert c.dispatch_one(NOW, 0.4) is not None


def test_usage_limit_threshold_gates_dispatch() -> None:
    c = controller(usage=StaticUsageLimit(0.8))
    c.enqueue(item(), pool_empty=False)
    assert c.dispatch_one(NOW, 0.8) is None  # saturation >= ceiling is gated
    assert c.dispatch_one(NOW, 0.79) is not None


@pytest.mark.parametrize(
    ("limits", "queued", "size", "ok"),
    [
        ({"max_requests": 2}, [1], 1, True),  # exactly at capacity after: allowed
        ({"max_requests": 2}, [1, 1], 1, False),  # one over
        ({"max_bytes": 100}, [60], 40, True),
        ({"max_bytes": 100}, [60], 41, False),
        ({"max_bytes": 0, "max_requests": 0}, [10**9] * 3, 10**9, True),  # 0 = no global limit
    ],
)
def test_global_capacity(limits: dict[str, int], queued: list[int], size: int, ok: bool) -> None:
    c = controller(**limits)
    c.config.default_band.max_bytes = 10**12
    for q in queued:
        assert c.enqueue(item(size=q), pool_empty=False) is None
    assert (c.enqueue(item(size=size), pool_empty=False) is None) is ok


def test_band_and_global_capacity_interact() -> None:
    c = controller(max_requests=3)
    c.config.bands[1] = BandConfig(
        1, max_requests=1, fairness=GlobalStrictFairness(), ordering=FcfsOrdering()
    )
    c.band(1)
    assert c.enqueue(item(prio=1), pool_empty=False) is None
    assert c.enqueue(item(prio=1), pool_empty=False) is Outcome.REJECTED_CAPACITY  # band full
    assert c.enqueue(item(prio=0), pool_empty=False) is None
    assert c.enqueue(item(prio=0), pool_empty=False) is None
    assert c.enqueue(item(prio=0), pool_empty=False) is Outcome.REJECTED_CAPACITY  # global full
    assert c.enqueue(item(prio=0), pool_empty=True) is Outcome.REJECTED_NO_ENDPOINTS  # empty pool: 503


def test_ttl_expiry_and_the_no_endpoint_budget() -> None:
    c = controller()
    a = item("a", ttl=1.0, no_endpoint_ttl=10.0, at=0.0)
    b = item("b", ttl=5.0, no_endpoint_ttl=10.0, at=0.0)
    c.enqueue(a, pool_empty=False)
    c.enqueue(b, pool_empty=False)
    assert c.next_deadline(pool_empty=False) == 1.0
    assert c.expire(0.5, pool_empty=False) == []
    assert c.expire(1.0, pool_empty=False) == [(a, Outcome.EVICTED_TTL)]
    # the pool empties: b's budget is now the no-endpoint one (re-evaluated, not fixed at enqueue)
    assert c.expire(6.0, pool_empty=True) == []
    assert c.expire(10.0, pool_empty=True) == [(b, Outcome.EVICTED_NO_ENDPOINTS)]
    assert c.count == 0 and c.bytes == 0


def test_exactly_once_finalization_dispatch_vs_expiry_vs_cancel() -> None:
    c = controller()
    a, b = item(ttl=1.0, at=0.0), item(ttl=1.0, at=0.0)
    c.enqueue(a, pool_empty=False)
    c.enqueue(b, pool_empty=False)
    assert c.dispatch_one(1.0, 0.0) is a
    assert c.remove(a) is False  # already dispatched
    assert c.expire(2.0, pool_empty=False) == [(b, Outcome.EVICTED_TTL)]
    assert c.remove(b) is False
    assert c.dispatch_one(2.0, 0.0) is None and c.count == 0


def test_cancel_frees_the_slot_at_once() -> None:
    c = controller(max_requests=1)
    a = item()
    c.enqueue(a, pool_empty=False)
    assert c.enqueue(item(), pool_empty=False) is Outcome.REJECTED_CAPACITY
    assert c.remove(a)
    assert c.enqueue(item(), pool_empty=False) is None


def test_shutdown_returns_every_queued_item_and_refuses_new_ones() -> None:
    c = controller()
    items = [item(str(i), prio=i % 2) for i in range(5)]
    for it in items:
        c.enqueue(it, pool_empty=False)
    assert set(map(id, c.shutdown())) == set(map(id, items))
    assert c.enqueue(item(), pool_empty=False) is Outcome.REJECTED_OTHER


def test_jit_bands_use_the_negative_template() -> None:
    neg = BandConfig(-1, max_requests=1, fairness=RoundRobinFairness(), ordering=EdfOrdering())
    c = controller(default_negative_band=neg)
    assert c.band(-7).config.max_requests == 1
    assert isinstance(c.band(-7).config.ordering, EdfOrdering)
    assert c.band(3).config.max_requests == 5000


def test_expiry_heaps_stay_bounded_under_churn() -> None:
    c = controller()
    for i in range(20_000):
        c.enqueue(item(ttl=60.0, at=float(i)), pool_empty=False)
        assert c.dispatch_one(float(i), 0.0) is not None
    assert len(c._ttl_heap) < 4 * c.count + 1100


# -- outcomes, config, signals -----------------------------------------------------------------------------
def test_outcome_table() -> None:
    table = [
        (Outcome.REJECTED_CAPACITY, False, 429, "rejected-saturated"),
        (Outcome.REJECTED_NO_ENDPOINTS, True, 503, "rejected-no-endpoints"),
        (Outcome.EVICTED_TTL, False, 429, "rejected-ttl-expired"),
        (Outcome.EVICTED_TTL, True, 503, "rejected-no-endpoints"),
        (Outcome.EVICTED_NO_ENDPOINTS, True, 503, "rejected-no-endpoints"),
        (Outcome.EVICTED_CONTEXT_CANCELLED, False, 503, "rejected-context-cancelled"),
        (Outcome.REJECTED_OTHER, False, 503, "rejected-shutting-down"),
        (Outcome.EVICTED_OTHER, False, 503, "rejected-shutting-down"),
        (Outcome.DISPATCHED, False, 500, ""),
    ]
    for outcome, empty, status, reason in table:
        d = translate(outcome, pool_empty=empty)
        assert (d.status, d.reason) == (status, reason), outcome


def test_config_defaults_match_the_reference() -> None:
    cfg = parse_flow_control(None, {}, "fc")
    assert (cfg.max_bytes, cfg.max_requests, cfg.default_ttl, cfg.no_endpoint_ttl) == (0, 0, 60.0, 60.0)
    assert cfg.default_band.max_bytes == 1_000_000_000 and cfg.default_band.max_requests == 5000
    assert isinstance(cfg.default_band.fairness, GlobalStrictFairness)
    assert isinstance(cfg.default_band.ordering, FcfsOrdering)
    assert isinstance(cfg.usage_limit, StaticUsageLimit) and cfg.usage_limit.threshold == 1.0
    assert isinstance(cfg.detector, UtilizationDetector)
    assert cfg.detector.staleness == pytest.approx(0.2)
    assert cfg.default_negative_band is None and not cfg.enable_eviction


def test_config_full_section() -> None:
    rr = RoundRobinFairness("rr")
    raw = {
        "maxBytes": "1Gi",
        "maxRequests": 100,
        "defaultRequestTTL": "1m30s",
        "noEndpointRequestTTL": "5m",
        "defaultPriorityBand": {"maxRequests": 10, "orderingPolicyRef": "edf-ordering-policy"},
        "defaultNegativePriorityBand": {"maxBytes": "1M"},
        "priorityBands": [{"priority": 10, "fairnessPolicyRef": "rr", "maxBytes": 0}],
        "usageLimitPolicyPluginRef": "soft-reflective-ceiling-policy",
        "saturationDetector": {"pluginRef": "concurrency-detector"},
        "enableEviction": False,
    }
    cfg = parse_flow_control(raw, {"rr": rr}, "fc")
    assert (cfg.max_bytes, cfg.max_requests, cfg.default_ttl, cfg.no_endpoint_ttl) == (
        2**30,
        100,
        90.0,
        300.0,
    )
    assert cfg.default_band.max_requests == 10 and isinstance(cfg.default_band.ordering, EdfOrdering)
    assert cfg.default_negative_band is not None and cfg.default_negative_band.max_bytes == 10**6
    assert cfg.bands[10].fairness is rr and cfg.bands[10].max_bytes == 1_000_000_000
    assert isinstance(cfg.usage_limit, SoftReflectiveCeiling)
    assert isinstance(cfg.detector, ConcurrencyDetector)
    assert parse_flow_control({"defaultRequestTTL": "0s"}, {}, "fc").default_ttl is None
    assert parse_flow_control({"defaultRequestTTL": "10s"}, {}, "fc").no_endpoint_ttl == 10.0


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"maxByte": 1}, "unknown key"),
        ({"maxBytes": "lots"}, "quantity"),
        ({"defaultRequestTTL": "soon"}, "duration"),
        ({"priorityBands": [{"maxBytes": 1}]}, "priority: required"),
        ({"priorityBands": [{"priority": 1}, {"priority": 1}]}, "duplicate"),
        ({"usageLimitPolicyPluginRef": "fcfs-ordering-policy"}, "expected one of"),
        ({"defaultPriorityBand": {"fairnessPolicyRef": "nope"}}, "neither a defined plugin"),
        ({"enableEviction": "yes"}, "expected true or false"),
    ],
)
def test_config_errors_name_the_key(raw: dict[str, object], match: str) -> None:
    with pytest.raises(InferouteError, match=match) as exc:
        parse_flow_control(raw, {}, "fc")
    assert exc.value.cause == "config"


def test_units_and_gates() -> None:
    assert quantity("512Mi", "q") == 512 * 2**20 and quantity(7, "q") == 7 and quantity("2k", "q") == 2000
    assert duration("500ms", "d") == 0.5 and duration(3, "d") == 3.0 and duration("1h", "d") == 3600.0
    assert gate_enabled(("flowControl",)) and gate_enabled(("flowControl=true",))
    assert not gate_enabled(("flowControl=false",)) and not gate_enabled(())
    assert not gate_enabled(("flowControl", "flowControl=false"))


def test_recommended_replicas_formula() -> None:
    assert recommended_replicas(4, 0.8, 0, 5) == 4  # at target: keep
    assert recommended_replicas(4, 1.2, 0, 5) == 6
    assert recommended_replicas(4, 1.0, 10, 5) == 7  # 5 + 2 for the queue
    assert recommended_replicas(0, 1.0, 3, 5) == 1  # scale from zero
    assert recommended_replicas(0, 0.0, 0, 5) == 0


# -- the contract suite: every fairness policy x every ordering policy --------------------------------------
FAIRNESS = [GlobalStrictFairness, RoundRobinFairness, ProgramAwareFairness]
ORDERING = [FcfsOrdering, EdfOrdering, SloDeadlineOrdering]


@pytest.mark.parametrize(("fair", "order"), list(itertools.product(FAIRNESS, ORDERING)))
def test_policy_contract(fair: type, order: type) -> None:
    """Whatever the policies: every item is dispatched exactly once, never from an empty flow, each flow in
    its ordering policy's order, priorities strictly first, and the counters return to zero."""
    rng = random.Random(3)
    ordering = order()
    c = controller(fair(), ordering)
    items = []
    for i in range(300):
        it = item(
            f"t{rng.randrange(5)}",
            rng.choice([0, 0, 1]),
            size=rng.randrange(1, 100),
            at=float(i),
            ttl=rng.choice([None, rng.uniform(1, 500)]),
            slo_ttft=rng.choice([None, rng.uniform(0.1, 400)]),
        )
        assert c.enqueue(it, pool_empty=False) is None
        items.append(it)
        if rng.random() < 0.3:  # interleave dispatches with arrivals
            assert c.dispatch_one(float(i), 0.0) is not None
    for it in rng.sample(items, 20):
        c.remove(it)
    while c.dispatch_one(NOW, 0.0) is not None:
        pass
    assert c.count == 0 and c.bytes == 0 and all(it.done for it in items)
    assert all(not b.flows for b in c.bands.values())


@pytest.mark.parametrize(("fair", "order"), list(itertools.product(FAIRNESS, ORDERING)))
def test_policy_contract_order_within_a_flow(fair: type, order: type) -> None:
    ordering = order()
    c = controller(fair(), ordering)
    rng = random.Random(5)
    for i in range(100):
        c.enqueue(
            item(f"t{i % 3}", at=float(i), ttl=rng.uniform(1, 50), slo_ttft=rng.uniform(0.1, 50)),
            pool_empty=False,
        )
    out = drain(c)
    assert len(out) == 100
    for fid in ("t0", "t1", "t2"):
        keys = [ordering.key(it) for it in out if it.fairness_id == fid]
        assert keys == sorted(keys)


def test_round_robin_gives_equal_shares_while_both_backlogged() -> None:
    c = controller(RoundRobinFairness())
    for i in range(100):
        c.enqueue(item("heavy", at=float(i)), pool_empty=False)
    for i in range(10):
        c.enqueue(item("light", at=float(i)), pool_empty=False)
    first20 = [c.dispatch_one(NOW, 0.0) for _ in range(20)]
    assert sum(1 for it in first20 if it is not None and it.fairness_id == "light") == 10


def test_stage_aware_saturation_gates_on_the_worse_stage() -> None:
    from inferoute.epp.flowcontrol.stages import ROLE_LABEL, stage_saturation

    d = ConcurrencyDetector("requests", 10)
    pre = ep(inflight=10)
    pre.labels = {ROLE_LABEL: "prefill"}
    dec, plain = ep(inflight=0), ep(inflight=2)
    dec.labels = {ROLE_LABEL: "decode"}
    s = stage_saturation(d, [pre, dec, plain], NOW)
    assert s == {"prefill": 1.0, "decode": 0.1, "effective": 1.0}
    assert stage_saturation(d, [dec, plain], NOW) == {"effective": 0.1, "decode": 0.1}
    # encode-only pods get no counted load: they are in neither stage; interleaved pods are in both
    enc, both = ep(inflight=0), ep(inflight=6)
    enc.labels = {ROLE_LABEL: "encode"}
    both.labels = {ROLE_LABEL: "encode-prefill-decode"}
    assert stage_saturation(d, [dec, plain, enc], NOW) == {"effective": 0.1, "decode": 0.1}
    s = stage_saturation(d, [pre, dec, both], NOW)
    assert s == {"prefill": 0.8, "decode": 0.3, "effective": 0.8}
    assert stage_saturation(d, [enc], NOW) == {"effective": 0.0}  # only encoders: measured whole
