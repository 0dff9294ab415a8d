"""Datastore readiness/staleness and the endpoint sources (no sockets, no sleeps)."""

from __future__ import annotations

from pathlib import Path

import pytest

from inferoute.clock import FakeClock
from inferoute.endpoints import Endpoint
from inferoute.epp.datalayer.datastore import Datastore
from inferoute.epp.datalayer.metrics import EndpointMetrics
from inferoute.epp.datalayer.sources import FileSource, StaticSource
from inferoute.errors import InferouteError

A = Endpoint("a", "10.0.0.1", 8000)
B = Endpoint("b", "10.0.0.2", 8000, {"inference.networking.k8s.io/engine-type": "sglang"})


def test_ready_after_every_endpoint_was_scraped_once() -> None:
    ds = Datastore(FakeClock(), staleness=2)
    assert not ds.ready()
    ds.set_endpoints([A, B])
    assert not ds.ready()
    ds.record_scrape(A.key, EndpointMetrics())
    assert not ds.ready()
    ds.record_scrape(B.key, None, "connection refused")  # tried counts
    assert ds.ready()
    assert [s.key for s in ds.fresh_states()] == [A.key]


def test_staleness_threshold() -> None:
    clock = FakeClock()
    ds = Datastore(clock, staleness=2)
    ds.set_endpoints([A])
    ds.record_scrape(A.key, EndpointMetrics(waiting=3))
    clock.advance(1.9)
    assert ds.fresh_states()
    ds.record_scrape(A.key, None, "timeout")
    assert ds.get(A.key).failures == 1  # type: ignore[union-attr]
    clock.advance(0.2)
    assert not ds.fresh_states()
    assert ds.get(A.key).metrics.waiting == 3  # type: ignore[union-attr]


def test_engine_from_label_and_state_kept_across_updates() -> None:
    ds = Datastore(FakeClock())
    ds.set_endpoints([A, B])
    assert ds.get(B.key).engine.name == "sglang"  # type: ignore[union-attr]
    ds.record_scrape(A.key, EndpointMetrics(waiting=7))
    added, removed = ds.set_endpoints([A, Endpoint("c", "10.0.0.3", 8000)])
    assert (added, removed) == (["10.0.0.3:8000"], [B.key])
    assert ds.get(A.key).metrics.waiting == 7  # type: ignore[union-attr]
    ds.record_scrape(B.key, EndpointMetrics())  # removed while in flight: ignored
    assert ds.get(B.key) is None


def test_unknown_engine_label_is_a_config_error() -> None:
    ds = Datastore(FakeClock())
    with pytest.raises(InferouteError, match="valid"):
        ds.set_endpoints([Endpoint("x", "10.0.0.9", 1, {"llm-d.ai/engine-type": "tgi"})])


def test_static_source() -> None:
    assert StaticSource([A]).initial() == [A]


def test_file_source_reloads_on_change_and_keeps_last_good(tmp_path: Path) -> None:
    f = tmp_path / "endpoints.yaml"
    f.write_text("endpoints:\n- {name: a, address: 10.0.0.1, port: 8000}\n")
    errors: list[InferouteError] = []
    src = FileSource(f, on_error=errors.append)
    assert [e.key for e in src.initial()] == ["10.0.0.1:8000"]
    assert src.poll() is None  # unchanged
    f.write_text(
        "pool:\n  endpoints:\n  - {name: a, address: 10.0.0.1, port: 8000}\n"
        "  - {name: b, address: 10.0.0.2, port: 8001, labels: {role: x}}\n"
    )
    got = src.poll()
    assert got is not None and [e.key for e in got] == ["10.0.0.1:8000", "10.0.0.2:8001"]
    f.write_text("endpoints:\n- {name: a, address: 10.0.0.1}\n")  # port missing
    assert src.poll() is None and len(errors) == 1 and "port" in errors[0].message


def test_file_source_startup_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(InferouteError, match="endpoints file"):
        FileSource(tmp_path / "missing.yaml").initial()
    bad = tmp_path / "bad.yaml"
    bad.write_text("endpionts: []\n")
    with pytest.raises(InferouteError, match=r"unknown key\(s\) \['endpionts'\]; valid: endpoints, pool"):
        FileSource(bad).initial()
