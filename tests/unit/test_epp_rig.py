"""Shared builders for the picker's unit tests (no sockets, no sleeps)."""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence

from prometheus_client import CollectorRegistry

from inferoute.clock import FakeClock
from inferoute.endpoints import Endpoint
from inferoute.epp.config import parse_config
from inferoute.epp.datalayer.datastore import Datastore
from inferoute.epp.datalayer.metrics import EndpointMetrics
from inferoute.epp.learned import LocalLearnedState
from inferoute.epp.metrics import EppMetrics
from inferoute.epp.plugin import PluginDeps
from inferoute.epp.requestcontrol.director import Director
from inferoute.epp.scheduling.types import Candidate, CycleContext, InferenceRequest
from inferoute.picking import PickRequest


def cand(key: str, **metrics: object) -> Candidate:
    return Candidate(key, key, EndpointMetrics(**metrics))  # type: ignore[arg-type]


def ctx(
    model: str = "m",
    prompt: bytes = b"",
    headers: Mapping[str, str] | None = None,
    learned: LocalLearnedState | None = None,
    seed: int = 1,
) -> CycleContext:
    req = InferenceRequest(model, model, prompt, (len(prompt) + 3) // 4, headers or {})
    return CycleContext(req, (learned or LocalLearnedState()).snapshot(), now=0.0, rng=random.Random(seed))


def body(model: str = "m", prompt: str = "hello world", **extra: object) -> bytes:
    return json.dumps({"model": model, "prompt": prompt, **extra}).encode()


def pick_request(
    b: bytes, headers: Mapping[str, str] | None = None, subset: Sequence[str] | None = None
) -> PickRequest:
    return PickRequest(
        "POST",
        "/v1/completions",
        dict(headers or {}),
        b,
        subset=tuple(subset) if subset is not None else None,
    )


class Rig:
    """A director over a datastore fed by hand (FakeClock), with its metrics registry."""

    def __init__(
        self,
        n: int = 3,
        config: str | None = None,
        *,
        objectives: Mapping[str, int] | None = None,
        seed: int = 7,
    ) -> None:
        self.clock = FakeClock(100.0)
        self.registry = CollectorRegistry()
        self.metrics = EppMetrics(self.registry)
        self.learned = LocalLearnedState()
        deps = PluginDeps(self.learned, self.clock, seed)
        self.config = parse_config(config, deps=deps, observer=self.metrics.plugin_observer)
        self.datastore = Datastore(self.clock, staleness=2.0)
        self.endpoints = [Endpoint(f"pod-{i}", f"10.0.0.{i + 1}", 8000) for i in range(n)]
        self.datastore.set_endpoints(self.endpoints)
        self.director = Director(
            self.datastore,
            self.config.scheduler,
            self.learned,
            self.metrics,
            self.clock,
            prefix=self.config.prefix,
            saturation=self.config.saturation,
            objectives=objectives,
            store=self.config.store,
            admitters=self.config.admitters,
            rng=random.Random(seed),
        )
        for ep in self.endpoints:
            self.scrape(ep.key)

    def scrape(self, key: str, **metrics: object) -> None:
        self.datastore.record_scrape(key, EndpointMetrics(scraped_at=self.clock.now(), **metrics))  # type: ignore[arg-type]

    def value(self, name: str, labels: Mapping[str, str] | None = None) -> float:
        v = self.registry.get_sample_value(name, dict(labels or {}))
        return 0.0 if v is None else v


def test_rig_starts_with_every_endpoint_fresh() -> None:
    rig = Rig(4)
    assert rig.datastore.ready()
    assert len(rig.datastore.fresh_states()) == 4
