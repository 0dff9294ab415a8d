"""The picker's hot-path metric series export exactly what prometheus_client would."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from inferoute.epp.metrics import EppMetrics, HotFamily, _HotCollector


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for m in registry.collect()
        for s in m.samples
        if not s.name.endswith("_created")
    }


def test_hot_series_expose_what_prometheus_client_would() -> None:
    values = [0.0, 0.05, 0.1, 0.1000001, 0.7, 1.0, 3.0, 1e9]
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    hist = HotFamily("histogram", "x_seconds", "doc", ["a"], (0.05, 0.1, 1.0))
    count = HotFamily("counter", "x_total", "doc", ["a"])
    gauge = HotFamily("gauge", "x_inflight", "doc", ["a"])
    ours.register(_HotCollector([hist, count, gauge]))
    ref_h = Histogram("x_seconds", "doc", ["a"], buckets=(0.05, 0.1, 1.0), registry=theirs).labels("q")
    ref_c = Counter("x_total", "doc", ["a"], registry=theirs).labels("q")
    ref_g = Gauge("x_inflight", "doc", ["a"], registry=theirs).labels("q")
    h, c, g = hist.histogram("q"), count.value("q"), gauge.value("q")
    for v in values:
        h.observe(v)
        ref_h.observe(v)
        c.inc(2)
        ref_c.inc(2)
        g.inc()
        ref_g.inc()
    g.dec(3)
    ref_g.dec(3)
    assert samples(ours) == samples(theirs)


def test_label_arity_is_checked() -> None:
    fam = HotFamily("counter", "y_total", "doc", ["a", "b"])
    with pytest.raises(ValueError, match="expected labels"):
        fam.value("only-one")


def test_close_frees_the_registry_for_a_new_picker() -> None:
    registry = CollectorRegistry()
    first = EppMetrics(registry)
    first.series("m", "m").request_total.inc()
    first.close()
    second = EppMetrics(registry)  # would raise "Duplicated timeseries" if anything stayed registered
    assert (
        registry.get_sample_value(
            "inference_objective_request_total", {"model_name": "m", "target_model_name": "m"}
        )
        is None
    )
    second.series("m", "m").request_total.inc()
    assert (
        registry.get_sample_value(
            "inference_objective_request_total", {"model_name": "m", "target_model_name": "m"}
        )
        == 1
    )
