"""The datastore: the pool's endpoints and the latest metrics snapshot of each (pure, clock-injected)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

from inferoute.clock import Clock
from inferoute.endpoints import Endpoint
from inferoute.epp.datalayer.metrics import (
    EMPTY_METRICS,
    ENGINE_LABELS,
    EndpointMetrics,
    EngineMapping,
    engine_for,
)

log = logging.getLogger(__name__)

MetricsListener = Callable[["EndpointState", bool], None]
"""Called after each successful scrape with (state, became_fresh): ``became_fresh`` is True when the endpoint
was not fresh before this scrape (never scraped, or its last good scrape older than the staleness)."""


class EndpointState:
    """One endpoint as the picker sees it. Mutated only by the datastore and the collector."""

    __slots__ = ("endpoint", "engine", "failures", "key", "last_attempt", "last_error", "last_ok", "metrics")

    def __init__(self, endpoint: Endpoint, engine: EngineMapping) -> None:
        self.endpoint = endpoint
        self.key = endpoint.key
        self.engine = engine
        self.metrics: EndpointMetrics = EMPTY_METRICS
        self.last_ok: float | None = None
        """Clock time of the last successful scrape (None: never)."""
        self.last_attempt: float | None = None
        self.failures = 0
        """Consecutive failed scrapes."""
        self.last_error = ""

    def fresh(self, now: float, staleness: float) -> bool:
        """True when the last successful scrape is younger than ``staleness`` seconds."""
        return self.last_ok is not None and now - self.last_ok <= staleness


class Datastore:
    """Endpoints by ``ip:port`` key, their snapshots, and the pool's readiness.

    ``ready()`` is the GIE "datastore synced" condition: the endpoint list is known and every endpoint has
    been
    scraped at least once (successfully or not), so the first picks are not made blind.
    """

    def __init__(self, clock: Clock, *, staleness: float = 2.0, default_engine: str = "vllm") -> None:
        self.clock = clock
        self.staleness = staleness
        self.default_engine = engine_for(default_engine)
        self._states: dict[str, EndpointState] = {}
        self._synced = False
        self.generation = 0
        """Bumped on every change of the endpoint set."""
        self.version = 0
        """Bumped on every :meth:`set_endpoints` (states may be replaced even when the set of keys stays) and
        :meth:`mark_down`."""
        self._listeners: list[MetricsListener] = []

    def add_metrics_listener(self, listener: MetricsListener) -> None:
        """Call ``listener`` after every successful scrape (see :data:`MetricsListener`); it must be cheap."""
        self._listeners.append(listener)

    def engine_of(self, endpoint: Endpoint) -> EngineMapping:
        for label in ENGINE_LABELS:
            name = endpoint.labels.get(label)
            if name:
                return engine_for(name)
        return self.default_engine

    def set_endpoints(self, endpoints: Iterable[Endpoint]) -> tuple[list[str], list[str]]:
        """Replace the endpoint set, keeping the state of endpoints that stay. Returns (added, removed)
        keys."""
        new: dict[str, EndpointState] = {}
        added: list[str] = []
        for ep in endpoints:
            old = self._states.get(ep.key)
            if old is not None and old.endpoint == ep:
                new[ep.key] = old
                continue
            state = EndpointState(ep, self.engine_of(ep))
            if old is not None:  # same address, new labels: keep what we learned from scraping
                state.metrics, state.last_ok, state.last_attempt = old.metrics, old.last_ok, old.last_attempt
            else:
                added.append(ep.key)
            new[ep.key] = state
        removed = [k for k in self._states if k not in new]
        self._states = new
        self._synced = True
        self.version += 1
        if added or removed:
            self.generation += 1
            log.info(
                "endpoints: %d added, %d removed, %d total (added %s)",
                len(added),
                len(removed),
                len(new),
                added[:5] + (["..."] if len(added) > 5 else []),
            )
        return added, removed

    @property
    def states(self) -> Mapping[str, EndpointState]:
        return self._states

    def get(self, key: str) -> EndpointState | None:
        return self._states.get(key)

    def record_scrape(
        self, key: str, metrics: EndpointMetrics | None, error: str = "", *, now: float | None = None
    ) -> None:
        """Store a scrape result (``metrics`` None means the scrape failed with ``error``) at clock time
        ``now`` (default: the clock's now)."""
        state = self._states.get(key)
        if state is None:  # removed while the scrape was in flight
            return
        if now is None:
            now = self.clock.now()
        state.last_attempt = now
        if metrics is None:
            state.failures += 1
            state.last_error = error
            return
        previous = state.last_ok
        state.metrics = metrics
        state.last_ok = now
        state.failures = 0
        state.last_error = ""
        if self._listeners:
            became_fresh = previous is None or now - previous > self.staleness
            for listener in self._listeners:
                listener(state, became_fresh)

    def mark_down(self, key: str, reason: str) -> bool:
        """Passive health: the data plane could not connect to ``key``. It stops being fresh at once (no
        new pick chooses it while another endpoint is fresh) until its next successful scrape. Returns
        False when it was unknown or already not fresh."""
        state = self._states.get(key)
        if state is None or state.last_ok is None:
            return False
        state.last_ok = None
        state.failures += 1
        state.last_error = f"the data plane reported: {reason}"
        self.version += 1  # the picker's cached candidate list is rebuilt without it
        log.warning(
            "endpoint %s marked down: the data plane reported %s; back at its next good scrape", key, reason
        )
        return True

    def ready(self) -> bool:
        """Endpoints known and each one scraped (or tried) at least once."""
        if not self._synced or not self._states:
            return False
        return all(s.last_attempt is not None for s in self._states.values())

    def fresh_states(self) -> list[EndpointState]:
        now = self.clock.now()
        return [s for s in self._states.values() if s.fresh(now, self.staleness)]
