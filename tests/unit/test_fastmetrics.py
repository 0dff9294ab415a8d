"""The shared lock-free metric families export exactly what prometheus_client would."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from inferoute.fastmetrics import DescribedFastCollector, FastCollector, FastFamily


def _samples(reg: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for metric in reg.collect()
        for s in metric.samples
        if not s.name.endswith("_created")
    }


def _exposition(reg: CollectorRegistry) -> list[str]:
    return [line for line in generate_latest(reg).decode().splitlines() if "_created" not in line]


@pytest.mark.parametrize("collector", [FastCollector, DescribedFastCollector])
def test_families_expose_what_prometheus_client_would(
    collector: type[FastCollector],
) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    buckets = (0.001, 0.01, 0.05, 0.1, 1.0)
    hist = FastFamily("histogram", "x_seconds", "doc", ["route"], buckets)
    count = FastFamily("counter", "x_events", "doc", ["route", "code"])
    gauge = FastFamily("gauge", "x_inflight", "doc", ["route"])
    ours.register(collector([hist, count, gauge]))
    ref_h = Histogram("x_seconds", "doc", ["route"], buckets=buckets, registry=theirs)
    ref_c = Counter("x_events", "doc", ["route", "code"], registry=theirs)
    ref_g = Gauge("x_inflight", "doc", ["route"], registry=theirs)
    h, g = hist.histogram("/a"), gauge.value("/a")
    # edges: a value equal to a bound is in it
    for v in (0.0, 0.0005, 0.001, 0.002, 0.01, 0.05, 0.1, 0.1000001, 0.5, 0.7, 1.0, 3.0, 100.0, 1e9):
        h.observe(v)
        ref_h.labels("/a").observe(v)
        g.inc()
        ref_g.labels("/a").inc()
    g.dec(3)
    ref_g.labels("/a").dec(3)
    hist.histogram("/b").observe(0.05)
    ref_h.labels("/b").observe(0.05)
    count.value("/a", "200").inc()
    count.value("/a", "200").inc(2)
    ref_c.labels("/a", "200").inc()
    ref_c.labels("/a", "200").inc(2)
    assert _samples(ours) == _samples(theirs)
    assert _exposition(ours) == _exposition(theirs)
    assert generate_latest(ours).decode().count("x_seconds_bucket") == 12


def test_unlabelled_families_and_set() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    hist = FastFamily("histogram", "y_ratio", "doc", (), (0.0, 0.5, 1.0))
    gauge = FastFamily("gauge", "y_size", "doc")
    ours.register(DescribedFastCollector([hist, gauge]))
    ref_h = Histogram("y_ratio", "doc", buckets=(0.0, 0.5, 1.0), registry=theirs)
    ref_g = Gauge("y_size", "doc", registry=theirs)
    for v in (0.0, 0.25, 0.5, 1.0):
        hist.histogram().observe(v)
        ref_h.observe(v)
    gauge.value().set(42)
    ref_g.set(42)
    assert _exposition(ours) == _exposition(theirs)


def test_label_arity_is_checked() -> None:
    fam = FastFamily("counter", "z_total", "doc", ["a", "b"])
    with pytest.raises(ValueError, match="expected labels"):
        fam.value("only-one")
    hist = FastFamily("histogram", "z_seconds", "doc", ["a"], (1.0,))
    with pytest.raises(ValueError, match="expected labels"):
        hist.histogram()


def test_only_the_described_collector_lets_the_registry_reject_duplicate_names() -> None:
    reg = CollectorRegistry()
    reg.register(DescribedFastCollector([FastFamily("counter", "d_total", "doc")]))
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        reg.register(DescribedFastCollector([FastFamily("counter", "d_total", "doc")]))
    reg.register(FastCollector([FastFamily("counter", "d_total", "doc")]))  # not checked, as before
