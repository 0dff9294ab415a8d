"""The request-control store: objectives, weighted rewrites (the reference's precedence), header aliases."""

from __future__ import annotations

import random

import pytest

from inferoute.epp.requestcontrol import headers as hdr
from inferoute.epp.requestcontrol.store import (
    RANK_CRD,
    RANK_CRD_DEPRECATED,
    RequestControlStore,
    RewriteRule,
    RewriteTarget,
    load_objectives,
    load_rewrites,
    parse_rule,
)
from inferoute.errors import InferouteError


def _rule(matches: tuple[str, ...], *targets: tuple[str, int]) -> RewriteRule:
    return RewriteRule(matches, tuple(RewriteTarget(m, w) for m, w in targets))


def test_objectives_by_source_unknown_is_zero() -> None:
    s = RequestControlStore()
    s.upsert_objective("ns/a", "premium", 5)
    s.upsert_objective("ns/b", "batch", -1)
    s.upsert_objective("ns/c", "plain", None)
    assert (s.priority("premium"), s.priority("batch"), s.priority("plain")) == (5, -1, 0)
    assert s.priority("nope") == 0 and s.priority(None) == 0
    s.upsert_objective("ns/a", "premium", 7)  # replaced by the same source
    assert s.priority("premium") == 7
    s.delete_objective("ns/a")
    assert s.priority("premium") == 0
    s.delete_objective("ns/a")  # deleting twice is harmless


def test_weighted_split_is_close_to_the_weights() -> None:
    s = RequestControlStore()
    s.upsert_rewrite("ns/r", [_rule(("food",), ("food-v1", 70), ("food-v2", 30))], created=1.0)
    rng = random.Random(7)
    picks = [s.rewrite("food", rng) for _ in range(10_000)]
    share = picks.count("food-v1") / len(picks)
    assert abs(share - 0.7) < 0.02
    assert s.rewrite("other", rng) is None


def test_precedence_exact_then_oldest_then_first_rule() -> None:
    s = RequestControlStore()
    rng = random.Random(0)
    s.upsert_rewrite("ns/generic", [_rule((), ("catch-all", 1))], created=0.0)
    s.upsert_rewrite("ns/newer", [_rule(("m",), ("newer", 1))], created=5.0)
    assert s.rewrite("m", rng) == "newer"  # exact beats an older generic rule
    assert s.rewrite("x", rng) == "catch-all"
    s.upsert_rewrite("ns/older", [_rule(("m",), ("older-1", 1)), _rule(("m",), ("older-2", 1))], created=1.0)
    assert s.rewrite("m", rng) == "older-1"  # oldest object, then its first rule
    s.delete_rewrite("ns/older")
    assert s.rewrite("m", rng) == "newer"


def test_lower_rank_shadows_the_same_name_and_orders_matches() -> None:
    s = RequestControlStore()
    rng = random.Random(0)
    s.upsert_objective("config/shared", "shared", 5)  # RANK_CONFIG, inserted first
    s.upsert_objective("old/ns/shared", "shared", 7, rank=RANK_CRD_DEPRECATED)
    assert s.priority("shared") == 7
    s.upsert_objective("new/ns/shared", "shared", 9, rank=RANK_CRD)
    assert s.priority("shared") == 9
    s.delete_objective("new/ns/shared")
    s.delete_objective("old/ns/shared")
    assert s.priority("shared") == 5  # shadowed, not lost
    # rewrites: same name shadows the whole entry, even rules for models the object does not match
    s.upsert_rewrite("config/r", [_rule(("a",), ("a-yaml", 1)), _rule(("b",), ("b-yaml", 1))], 0.0, name="r")
    s.upsert_rewrite("crd/ns/r", [_rule(("a",), ("a-crd", 1))], 9e9, name="r", rank=RANK_CRD)
    assert (s.rewrite("a", rng), s.rewrite("b", rng)) == ("a-crd", None)
    # another name matching the same model: the lower rank first, although younger; Exact still beats generic
    s.upsert_rewrite("config/g", [_rule(("c",), ("c-yaml", 1))], 0.0, name="g")
    s.upsert_rewrite("crd/ns/g2", [_rule(("c",), ("c-crd", 1))], 9e9, name="g2", rank=RANK_CRD)
    s.upsert_rewrite("crd/ns/any", [_rule((), ("catch-all", 1))], 0.0, name="any", rank=RANK_CRD)
    assert s.rewrite("c", rng) == "c-crd"
    s.delete_rewrite("crd/ns/g2")
    assert s.rewrite("c", rng) == "c-yaml"  # a YAML Exact match beats an object's generic rule
    s.delete_rewrite("crd/ns/r")
    assert (s.rewrite("a", rng), s.rewrite("b", rng)) == ("a-yaml", "b-yaml")


def test_yaml_sections_and_errors() -> None:
    s = RequestControlStore()
    load_objectives(s, [{"name": "chat", "priority": 10}, {"name": "batch", "priority": -1}], "objectives")
    load_objectives(s, {"bulk": -5}, "objectives")
    assert s.objectives() == {"chat": 10, "batch": -1, "bulk": -5}
    load_rewrites(
        s,
        [
            {
                "name": "r",
                "rules": [{"matches": [{"model": {"value": "a"}}], "targets": [{"modelRewrite": "b"}]}],
            }
        ],
        "modelRewrites",
    )
    assert s.rewrite("a", random.Random(0)) == "b"
    bad = [
        {"matches": [], "targets": []},
        {"targets": [{"modelRewrite": "x", "weight": 1}, {"modelRewrite": "y"}]},
        {"targets": [{"modelRewrite": "x", "weight": 0}]},
        {"matches": [{"model": {"type": "Prefix", "value": "a"}}], "targets": [{"modelRewrite": "x"}]},
    ]
    for raw in bad:
        with pytest.raises(InferouteError) as exc:
            parse_rule(raw, "r")
        assert exc.value.cause == "config"
    with pytest.raises(InferouteError, match="priority"):
        load_objectives(s, [{"name": "x", "priority": "high"}], "objectives")


def test_header_aliases_current_name_wins() -> None:
    h = {"x-gateway-inference-objective": "old", "x-llm-d-inference-objective": "new"}
    assert hdr.first(h, hdr.OBJECTIVE) == "new"
    assert hdr.first({"x-gateway-inference-fairness-id": "t1"}, hdr.FAIRNESS_ID) == "t1"
    assert hdr.positive_ms({"x-slo-ttft-ms": "250"}, hdr.SLO_TTFT_MS) == 0.25
    for bad in ("abc", "-3", "0", "nan", "inf"):
        assert hdr.positive_ms({"x-llm-d-slo-ttft-ms": bad}, hdr.SLO_TTFT_MS) is None


def test_every_request_control_header_is_in_the_control_set() -> None:
    """The director skips the header lookups for a request with none of CONTROL: a name missing from it
    would be silently ignored."""
    names = {n for v in vars(hdr).values() if isinstance(v, tuple) and len(v) == 2 for n in v}
    assert names and names == hdr.CONTROL
