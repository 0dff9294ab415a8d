"""Dark launch: what the ``shadow`` profiles would have picked, how often they agree, and what they cost.

A profile named ``shadow`` (or ``shadow-*``) in an EndpointPickerConfig runs on every live request after the
live decision and never changes it (:class:`~inferoute.epp.scheduling.framework.Scheduler`). This module
records each shadow run:

* ``inferoute_epp_shadow_decisions_total{profile, outcome}`` -- ``agree`` (same primary endpoint as the live
  profile), ``disagree`` or ``error`` (the shadow raised or left no endpoint). The agreement rate is
  ``agree / (agree + disagree)``;
* ``inferoute_epp_shadow_picks_total{profile, endpoint}`` -- what it would have picked (endpoints are the
  pool's, a bounded set);
* ``inferoute_epp_shadow_duration_seconds{profile}`` -- the time of each shadow run, on the picker's one
  thread: its CPU cost on the request path;
* a DEBUG log line per disagreement: ``shadow <profile> would pick <endpoint>, live picked <endpoint>``.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Histogram

from inferoute.epp.scheduling.framework import ProfileResult, Scheduler

log = logging.getLogger(__name__)

_BUCKETS = (0.00001, 0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05)


class ShadowMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.decisions = Counter(
            "inferoute_epp_shadow_decisions",
            "Shadow-profile runs by agreement with the live profile's pick.",
            ["profile", "outcome"],
            registry=registry,
        )
        self.picks = Counter(
            "inferoute_epp_shadow_picks",
            "What each shadow profile would have picked.",
            ["profile", "endpoint"],
            registry=registry,
        )
        self.seconds = Histogram(
            "inferoute_epp_shadow_duration_seconds",
            "Time of one shadow-profile run (picker CPU on the request path).",
            ["profile"],
            buckets=_BUCKETS,
            registry=registry,
        )

    def attach(self, scheduler: Scheduler) -> None:
        scheduler.shadow_report = self.report

    def report(self, profile: str, live: str, result: ProfileResult | None, seconds: float) -> None:
        self.seconds.labels(profile).observe(seconds)
        if result is None:
            self.decisions.labels(profile, "error").inc()
            return
        pick = result.endpoints[0].key
        self.picks.labels(profile, pick).inc()
        if pick == live:
            self.decisions.labels(profile, "agree").inc()
        else:
            self.decisions.labels(profile, "disagree").inc()
            log.debug("shadow %s would pick %s, live picked %s", profile, pick, live)

    def close(self) -> None:
        for m in (self.decisions, self.picks, self.seconds):
            try:
                self.registry.unregister(m)
            except KeyError:
                continue
