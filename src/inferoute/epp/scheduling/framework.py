"""The scheduling engine: profile = filters → weighted scorers → one picker.

The engine enforces the invariants so plugins stay simple:

* every score is clamped to [0, 1] (NaN counts as 0) before its weight is applied;
* every scorer has an explicit positive weight (checked at construction);
* every plugin call is timed into ``observe(extension_point, type, name)`` (a histogram in production);
* an empty candidate list after the filters is a scheduling failure (:class:`NoEndpoints`).

After a successful cycle the engine says what was learned without changing anything: the result carries
records (:mod:`inferoute.epp.learned.port`) — the primary endpoint now holds the request's prefix blocks (when
any plugin computed them) and, with autoTune, its KV capacity — for the director to apply. Plugins
implementing ``PickObserver`` are told of the pick.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, runtime_checkable

from inferoute.epp.learned.port import Capacity, Placed, Record
from inferoute.epp.scheduling.types import (
    Candidate,
    CycleContext,
    Filter,
    PickerPlugin,
    PickObserver,
    Scorer,
)

Observe = Callable[[float], None]
ObserverFactory = Callable[[str, str, str], Observe]
"""(extension_point, plugin_type, plugin_name) -> observe(seconds)."""

log = logging.getLogger(__name__)


def _no_observe(seconds: float) -> None:
    return None


def no_observer(extension_point: str, plugin_type: str, plugin_name: str) -> Observe:
    return _no_observe


class NoEndpoints(Exception):
    """No candidate survived the filters (GIE answers 429 for this)."""


@dataclass(frozen=True, slots=True)
class WeightedScorer:
    scorer: Scorer
    weight: float


@dataclass(slots=True)
class ProfileResult:
    profile: str
    endpoints: list[Candidate]
    """Primary first, then fallbacks."""
    candidates: list[Candidate]
    totals: list[float]
    """Weighted total score of each candidate (same order)."""
    records: tuple[Record, ...] = ()
    """What the cycle learned, for the director to apply to the learned state (empty for a shadow run)."""
    headers: Mapping[str, str] = field(default_factory=dict)
    """Request headers the profile handler asks for (``x-prefiller-host-port`` after a prefill pick)."""
    others: Mapping[str, ProfileResult] = field(default_factory=dict)
    """The other live profiles' results of this cycle, by profile name (the primary is this one)."""

    @property
    def scores(self) -> dict[str, float]:
        """Total weighted score per candidate key (debugging, score emission)."""
        return {c.key: t for c, t in zip(self.candidates, self.totals, strict=True)}


def weighted_totals(weights: Sequence[float], scores: Sequence[Sequence[float]], n: int) -> list[float]:
    """``sum(w * clamp(s))`` per candidate, scorers added in order from 0.0; ``clamp`` maps to [0, 1] and NaN
    (which fails both comparisons) to 0. One pass for up to three scorers (the built-in profiles), the same
    float operations in the same order as the general loop."""
    k = len(weights)
    if k == 3:
        w1, w2, w3 = weights
        return [
            0.0
            + w1 * (a if 0.0 <= a <= 1.0 else (1.0 if a > 1.0 else 0.0))
            + w2 * (b if 0.0 <= b <= 1.0 else (1.0 if b > 1.0 else 0.0))
            + w3 * (c if 0.0 <= c <= 1.0 else (1.0 if c > 1.0 else 0.0))
            for a, b, c in zip(*scores, strict=True)
        ]
    if k == 2:
        w1, w2 = weights
        return [
            0.0
            + w1 * (a if 0.0 <= a <= 1.0 else (1.0 if a > 1.0 else 0.0))
            + w2 * (b if 0.0 <= b <= 1.0 else (1.0 if b > 1.0 else 0.0))
            for a, b in zip(*scores, strict=True)
        ]
    totals = [0.0] * n
    for w, column in zip(weights, scores, strict=True):
        totals = [
            t + w * (s if 0.0 <= s <= 1.0 else (1.0 if s > 1.0 else 0.0))
            for t, s in zip(totals, column, strict=True)
        ]
    return totals


class SchedulerProfile:
    """One named pipeline of filters, weighted scorers and a picker."""

    def __init__(
        self,
        name: str,
        filters: Sequence[Filter],
        scorers: Sequence[WeightedScorer],
        picker: PickerPlugin,
        *,
        observer: ObserverFactory = no_observer,
    ) -> None:
        for ws in scorers:
            if not ws.weight > 0:
                raise ValueError(f"profile {name}: scorer {ws.scorer.name} needs a positive weight")
        self.name = name
        self.filters = list(filters)
        self.scorers = list(scorers)
        self.picker = picker
        self._filter_obs = [observer("filter", f.type_name, f.name) for f in self.filters]
        self._scorer_obs = [observer("scorer", s.scorer.type_name, s.scorer.name) for s in self.scorers]
        self._picker_obs = observer("picker", picker.type_name, picker.name)
        self._weights = tuple(ws.weight for ws in self.scorers)
        plugins: list[object] = [*self.filters, *(s.scorer for s in self.scorers), picker]
        self._observers = [p for p in plugins if isinstance(p, PickObserver)]

    def run(self, ctx: CycleContext, candidates: list[Candidate], *, observe: bool = True) -> ProfileResult:
        """Filters, scorers, picker. ``observe=False`` (a shadow run) skips the plugins' ``on_picked``, so a
        decision that is not taken teaches the learned state nothing."""
        perf = time.perf_counter
        for f, obs in zip(self.filters, self._filter_obs, strict=True):
            t0 = perf()
            candidates = f.filter(ctx, candidates)
            obs(perf() - t0)
            if not candidates:
                raise NoEndpoints(f"filter {f.name} left no endpoints")
        if not candidates:
            raise NoEndpoints("no candidate endpoints")

        all_scores: list[Sequence[float]] = []
        for ws, obs in zip(self.scorers, self._scorer_obs, strict=True):
            t0 = perf()
            scores = ws.scorer.score(ctx, candidates)
            obs(perf() - t0)
            if len(scores) != len(candidates):
                raise RuntimeError(
                    f"scorer {ws.scorer.name} returned {len(scores)} scores for {len(candidates)}"
                )
            all_scores.append(scores)
        totals = weighted_totals(self._weights, all_scores, len(candidates))

        t0 = perf()
        picked = self.picker.pick(ctx, candidates, totals)
        self._picker_obs(perf() - t0)
        if not picked:
            raise NoEndpoints(f"picker {self.picker.name} chose nothing")
        if observe:
            for o in self._observers:
                o.on_picked(ctx, picked[0], candidates)
        return ProfileResult(self.name, picked, candidates, totals)


ShadowReport = Callable[[str, str, "ProfileResult | None", float], None]
"""(shadow profile, live pick, the shadow's result or None on failure, seconds it took)."""

SHADOW_PREFIX = "shadow"


def is_shadow(profile_name: str) -> bool:
    """Profiles named ``shadow`` or ``shadow-*`` are dark-launched."""
    return profile_name == SHADOW_PREFIX or profile_name.startswith(SHADOW_PREFIX + "-")


@runtime_checkable
class ProfileHandler(Protocol):
    """Which live profiles run for a request and whose pick is the primary (the reference's
    ``ProfileHandler``: ``single-profile-handler``, ``disagg-profile-handler``)."""

    type_name: ClassVar[str]
    name: str

    def check(self, live: Sequence[str]) -> None:
        """Raise ValueError when the live profile names do not fit this handler."""
        ...

    def run(
        self, profiles: Mapping[str, SchedulerProfile], ctx: CycleContext, candidates: list[Candidate]
    ) -> ProfileResult:
        """Run the profiles this request needs; the primary's result, the others in ``others``."""
        ...


class SingleProfileHandler:
    """``single-profile-handler`` (the default): exactly one live profile, always run."""

    type_name: ClassVar[str] = "single-profile-handler"

    def __init__(self, name: str = "single-profile-handler") -> None:
        self.name = name
        self._only = ""

    def check(self, live: Sequence[str]) -> None:
        if len(live) != 1:
            raise ValueError(
                "single-profile-handler runs exactly one live profile, got "
                f"{len(live)} ({', '.join(live) or 'none'}); name others shadow or shadow-* to dark-launch "
                "them, or declare a disagg-profile-handler to run several"
            )
        self._only = live[0]

    def run(
        self, profiles: Mapping[str, SchedulerProfile], ctx: CycleContext, candidates: list[Candidate]
    ) -> ProfileResult:
        return profiles[self._only].run(ctx, candidates)


class Scheduler:
    """Runs the live profiles through the profile handler (``single-profile-handler`` by default), then any
    dark-launched ``shadow`` profiles, and returns what the learned prefix state should learn
    (``ProfileResult.records``).

    A shadow profile runs on every live request after the live decision, on its own copy of the candidate
    list and without ``on_picked`` (it never changes the decision nor what the picker learns); its pick, its
    agreement with the live pick and its time go to ``shadow_report``. A failing shadow is reported, never
    raised."""

    def __init__(self, profiles: Sequence[SchedulerProfile], handler: ProfileHandler | None = None) -> None:
        live = [p for p in profiles if not is_shadow(p.name)]
        self.handler = handler or SingleProfileHandler()
        self.handler.check([p.name for p in live])
        self.profiles = list(profiles)
        self.live = {p.name: p for p in live}
        self.primary = live[0]
        self.shadows = [p for p in profiles if is_shadow(p.name)]
        self.shadow_report: ShadowReport | None = None

    def schedule(self, ctx: CycleContext, candidates: list[Candidate]) -> ProfileResult:
        if type(self.handler) is SingleProfileHandler:
            result = self.primary.run(ctx, candidates)
        else:
            result = self.handler.run(self.live, ctx, candidates)
        if self.shadows:
            self._run_shadows(ctx, candidates, result)
        hashes = ctx.hashes_computed
        if not hashes:
            return result
        picked = result.endpoints[0]
        records: list[Record] = []
        met = picked.metrics
        if ctx.prefix_settings.auto_tune and met.num_gpu_blocks:
            block = met.block_size or ctx.prefix_settings.block_size_tokens
            records.append(Capacity(picked.key, met.num_gpu_blocks * block))
        # each hashed block stands for its share of the whole prompt (the server caches all of it)
        per_block = -(-ctx.request.prompt_tokens // len(hashes))
        known = ctx.matched_blocks(picked.key)
        records.append(Placed(picked.key, tuple(hashes), max(per_block, 1), known))
        result.records = tuple(records)  # the result was made for this cycle: nobody else holds it
        return result

    def _run_shadows(self, ctx: CycleContext, candidates: list[Candidate], live: ProfileResult) -> None:
        live_key = live.endpoints[0].key
        report = self.shadow_report
        for shadow in self.shadows:
            t0 = time.perf_counter()
            result: ProfileResult | None
            try:
                result = shadow.run(ctx, list(candidates), observe=False)
            except Exception:  # a dark-launched algorithm must never fail a live request
                log.debug("shadow profile %s failed", shadow.name, exc_info=True)
                result = None
            if report is not None:
                report(shadow.name, live_key, result, time.perf_counter() - t0)
