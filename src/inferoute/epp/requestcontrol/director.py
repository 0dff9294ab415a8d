"""The director: one request through request control and scheduling, and its response accounting.

``Director.decide`` is synchronous and does no I/O::

    parse body (400) → model rewrite header → objective → priority
      → candidates: subset hint (503 when empty/no match), endpoints with fresh metrics (503 when none)
      → admission: sheddable (priority < 0) while the pool is saturated → 429   [flow-control seam]
      → schedule (profiles → filters → scorers → picker; 429 when nothing is left)
      → learn (prefix index, in-flight +1) → Destination(primary, fallbacks...)

Every rejection is a :class:`~inferoute.picking.Reject` with an OpenAI-style body, logged and counted in
``inference_objective_request_error_total{error_code}``. The returned :class:`Session` follows the response to
release the in-flight counts and to read token usage from the response tail.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable, Mapping, Sequence, ValuesView
from dataclasses import dataclass
from typing import Protocol

import msgspec

from inferoute.clock import Clock
from inferoute.endpoints import Endpoint, split_hostport
from inferoute.epp.datalayer.datastore import Datastore, EndpointState
from inferoute.epp.flowcontrol import SaturationDetector
from inferoute.epp.learned import Finished, FirstByte, LearnedState, LearnedView, Started
from inferoute.epp.metrics import EppMetrics, ModelSeries
from inferoute.epp.requestcontrol import headers as hdr
from inferoute.epp.requestcontrol.parse import CHARS_PER_TOKEN, BodyParser, ParsedBody
from inferoute.epp.requestcontrol.store import RequestControlStore
from inferoute.epp.requestcontrol.usage import TailBuffer, Usage, parse_usage
from inferoute.epp.scheduling.framework import NoEndpoints, ProfileResult, Scheduler
from inferoute.epp.scheduling.prefix import PrefixHashCache
from inferoute.epp.scheduling.types import (
    Candidate,
    CycleContext,
    InferenceRequest,
    PrefixSettings,
    uncached_tokens,
)
from inferoute.errors import InferouteError
from inferoute.picking import (
    MAX_MODEL_NAME_CHARS,
    MODEL_HEADER,
    Decision,
    Destination,
    NullSession,
    PickRequest,
    PickSession,
    Reject,
)

log = logging.getLogger(__name__)

DEFAULT_FAIRNESS_ID = hdr.DEFAULT_FAIRNESS_ID
MAX_REMEMBERED_REMOVALS = 10_000
FALLBACKS = 2
"""Endpoints added after the scheduled ones when the scheduler chose at most this many
(:attr:`Destination.fallbacks <inferoute.picking.Destination.fallbacks>`)."""


def match_subset(states: Sequence[EndpointState], subset: Sequence[str]) -> list[EndpointState]:
    """Endpoints named by a subset hint: ``ip:port`` tokens match exactly, bare ``ip`` tokens match any
    port."""
    exact: set[str] = set()
    hosts: set[str] = set()
    for token in subset:
        token = token.strip()
        if not token:
            continue
        try:
            host, port = split_hostport(token)
        except ValueError:
            continue
        if port is None:
            hosts.add(host)
        else:
            exact.add(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return [s for s in states if s.key in exact or s.endpoint.address in hosts]


def _rewrite_model(body: bytes, target: str) -> bytes:
    doc = msgspec.json.decode(body)
    if isinstance(doc, dict):
        doc["model"] = target
    return msgspec.json.encode(doc)


def _with_inflight(candidates: list[Candidate], view: LearnedView) -> list[Candidate]:
    """Give each candidate its in-flight counts as of ``view`` (candidate views are reused across cycles)."""
    inflight = view.inflight
    for c in candidates:
        c.inflight = inflight(c.key)
    return candidates


class Admitter(Protocol):
    def refuse(self, ctx: CycleContext, candidates: Sequence[Candidate]) -> str | None: ...


@dataclass(slots=True)
class Prepared:
    """A request after request control, ready for flow control and scheduling."""

    request: InferenceRequest
    subset: tuple[str, ...] | None
    series: ModelSeries
    set_headers: dict[str, str]
    body: bytes | None
    """The rewritten body, None when unchanged."""
    size: int
    """Request body bytes (what flow control's byte limits count)."""


class Director:
    """Glue of the picker's layers for one request (see module docstring)."""

    def __init__(
        self,
        datastore: Datastore,
        scheduler: Scheduler,
        learned: LearnedState,
        metrics: EppMetrics,
        clock: Clock,
        *,
        prefix: PrefixSettings | None = None,
        saturation: SaturationDetector | None = None,
        objectives: Mapping[str, int] | None = None,
        store: RequestControlStore | None = None,
        rng: random.Random | None = None,
        admitters: Sequence[Admitter] = (),
    ) -> None:
        self.datastore = datastore
        self.scheduler = scheduler
        self.learned = learned
        self.metrics = metrics
        self.clock = clock
        self.prefix = prefix or PrefixSettings()
        self.saturation = saturation
        self.admitters = list(admitters)
        """Admission plugins: each may refuse a request (429) before scheduling."""
        self.store = store or RequestControlStore()
        """Objectives and model rewrites (the picker's YAML and, later, Kubernetes objects fill it)."""
        for name, prio in (objectives or {}).items():
            self.store.upsert_objective(f"options/{name}", name, prio)
        self.rng = rng or random.Random()
        self._body_parser = BodyParser()
        self.hash_cache = PrefixHashCache()
        """Prefix chains of recent long prompts (shared documents are not hashed again)."""
        self._cands: dict[EndpointState, Candidate] = {}
        self._pool: list[Candidate] | None = None
        """The fresh candidates of the whole pool, reused while valid (see :meth:`_pool_candidates`)."""
        self._pool_version = -1
        self._pool_oldest = 0.0
        self._removals: dict[str, int] = {}
        """How often each endpoint left the pool (see :meth:`set_endpoints`)."""
        self._fallback_cursor = 0
        datastore.add_metrics_listener(self._on_metrics)
        """Scheduling view of each endpoint state, keyed by the state object (replaced state: new view)."""

    # -- rejections -------------------------------------------------------------------------------------
    def _reject(
        self,
        status: int,
        message: str,
        cause: str,
        model: str = "",
        target: str = "",
        param: str | None = None,
    ) -> Reject:
        err = InferouteError(status, message, cause=cause, param=param)
        log.info("reject %s: %s", status, message)
        model, target = self.metrics.bounded(model, target)
        self.metrics.request_error_total.labels(model, target, str(status)).inc()
        return Reject(status, err.body(), {"content-type": "application/json"}, cause)

    # -- the decision -------------------------------------------------------------------------------------
    def _parse(self, body: bytes) -> ParsedBody | InferouteError:
        """The body parsed here, or the 400 it deserves (a data plane that parsed it hands its result on in
        :attr:`PickRequest.parsed <inferoute.picking.PickRequest.parsed>`: one parse per request)."""
        try:
            return self._body_parser.parse(body)
        except InferouteError as exc:
            return exc

    def decide(self, request: PickRequest) -> tuple[Decision, PickSession]:
        """Request control, legacy admission and scheduling in one synchronous call (flow control off)."""
        prep = self.prepare(request)
        if not isinstance(prep, Prepared):
            return prep
        return self.schedule(prep, admission=True)

    def prepare(self, request: PickRequest) -> Prepared | tuple[Decision, PickSession]:
        """Request control: parse the body, apply the control headers, the rewrite and the objective. A
        rejection (bad body, bodyless request decided at once) comes back as a ``(Decision, session)``."""
        if not request.body and request.method.upper() in ("GET", "HEAD", "DELETE", "OPTIONS"):
            return self._bodyless(request), NullSession()
        parsed = request.parsed if request.parsed is not None else self._parse(request.body)
        if isinstance(parsed, InferouteError):
            return self._reject(
                parsed.status, parsed.message, parsed.cause, request.model or "", param=parsed.param
            ), NullSession()
        model = parsed.model
        headers = request.headers
        control = hdr.control(headers)
        target = control.rewrite or self.store.rewrite(model, self.rng) or model
        if len(model) > MAX_MODEL_NAME_CHARS or len(target) > MAX_MODEL_NAME_CHARS:
            message = f"the model name is longer than {MAX_MODEL_NAME_CHARS} characters"
            return self._reject(400, message, "bad-model", param="model"), NullSession()
        body: bytes | None = None
        set_headers: dict[str, str] = {}
        if target != model:
            body = _rewrite_model(request.body, target)
            set_headers[MODEL_HEADER] = target
            self.metrics.model_rewrite_total.labels(*self.metrics.bounded(model, target)).inc()
        objective = control.objective
        series = self.metrics.series(model, target)
        series.request_total.inc()
        prompt_tokens = (len(parsed.prompt) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN
        ireq = InferenceRequest(
            model=model,
            target_model=target,
            prompt=parsed.prompt,
            prompt_tokens=prompt_tokens,
            headers=headers,
            request_id=request.request_id,
            objective=objective,
            fairness_id=control.fairness_id,
            priority=self.store.priority(objective),
            stream=parsed.stream,
            slo_ttft=control.slo_ttft,
            slo_tpot=control.slo_tpot,
        )
        return Prepared(ireq, request.subset, series, set_headers, body, len(request.body))

    def candidates(self, subset: Sequence[str] | None, now: float) -> list[Candidate] | str:
        """The endpoints a request may go to now, or why there are none (a 503 message)."""
        states: Sequence[EndpointState] | ValuesView[EndpointState] = self.datastore.states.values()
        if subset is not None:
            states = match_subset(list(states), subset)
            if not states:
                return f"no endpoint of the pool matches the subset hint {list(subset)!r}"
        if not states:
            return "no ready endpoints in the pool"
        if subset is None:
            candidates = self._pool_candidates(now)
        else:
            candidates = self._candidates(states, now, self.datastore.staleness)
        if not candidates:
            # Nothing has fresh metrics (e.g. servers without /metrics): schedule blind rather than refuse.
            self.metrics.stale_fallbacks.inc()
            candidates = self._candidates(states, now, None)
        return candidates

    def all_candidates(self, now: float) -> list[Candidate]:
        """Every endpoint of the pool, fresh or not (what flow control measures saturation over)."""
        return _with_inflight(
            self._candidates(self.datastore.states.values(), now, None), self.learned.snapshot()
        )

    def schedule(self, prep: Prepared, *, admission: bool) -> tuple[Decision, PickSession]:
        """Candidates, the legacy admission check (``admission``), scheduling and learning."""
        ireq = prep.request
        model, target = ireq.model, ireq.target_model
        now = self.clock.now()
        candidates = self.candidates(prep.subset, now)
        if isinstance(candidates, str):
            return self._reject(503, candidates, "no-endpoints", model, target), NullSession()
        view = self.learned.snapshot()
        _with_inflight(candidates, view)
        if admission and ireq.priority < 0 and self.saturation is not None:
            level = self.saturation.saturation(candidates, now)
            if level >= 1.0:
                return self._reject(
                    429,
                    "request shed: the pool is saturated and the request is sheddable "
                    f"(objective {ireq.objective!r}, priority {ireq.priority})",
                    "shed",
                    model,
                    target,
                ), NullSession()
        ctx = CycleContext(
            ireq, view, now=now, rng=self.rng, prefix_settings=self.prefix, hash_cache=self.hash_cache
        )
        for admitter in self.admitters:
            why = admitter.refuse(ctx, candidates)
            if why is not None:
                return self._reject(429, why, "slo-shed", model, target), NullSession()
        t0 = time.perf_counter()
        try:
            result = self.scheduler.schedule(ctx, candidates)
        except NoEndpoints as exc:
            self.metrics.attempt_failure.inc()
            return self._reject(
                429, f"no endpoint can serve the request: {exc}", "no-capacity", model, target
            ), NullSession()
        self.metrics.scheduler_e2e.observe(time.perf_counter() - t0)
        self.metrics.attempt_success.inc()
        self._observe_prefix(ctx, result)

        primary = result.endpoints[0].key
        prefill_tokens = uncached_tokens(ctx, primary)
        self.learned.apply((*result.records, Started(primary, ireq.prompt_tokens, prefill_tokens)))
        prep.series.running.inc()
        session = Session(self, prep.series, primary, ireq.prompt_tokens, prefill_tokens, now)
        restore = (target, model) if prep.body is not None else None
        headers = {**prep.set_headers, **result.headers} if result.headers else prep.set_headers
        chosen = tuple(c.key for c in result.endpoints)
        fallbacks = self._fallbacks(candidates, chosen) if len(chosen) <= FALLBACKS else ()
        return Destination(chosen, headers, prep.body, restore, fallbacks), session

    def _fallbacks(self, candidates: Sequence[Candidate], chosen: tuple[str, ...]) -> tuple[str, ...]:
        """Up to :data:`FALLBACKS` candidates the scheduler did not choose, taken in turn (no randomness:
        the scheduler's random draws stay as they were), so a dead primary costs a retry, not a 502."""
        n = len(candidates)
        if n <= len(chosen):
            return ()
        start = self._fallback_cursor = (self._fallback_cursor + 1) % n
        out: list[str] = []
        for i in range(n):
            key = candidates[(start + i) % n].key
            if key not in chosen:
                out.append(key)
                if len(out) == FALLBACKS:
                    break
        return tuple(out)

    def set_endpoints(self, endpoints: Iterable[Endpoint]) -> tuple[list[str], list[str]]:
        """Replace the pool's endpoint set; the learned state forgets removed endpoints. A session whose
        endpoint left the pool since it began (and maybe came back: a new registration, or a new pod on the
        old address) no longer touches that endpoint's in-flight counts, which are the new registration's.
        Returns (added, removed) keys."""
        added, removed = self.datastore.set_endpoints(endpoints)
        if removed:
            self.learned.forget_endpoints(removed)
            rem = self._removals
            if len(rem) > MAX_REMEMBERED_REMOVALS:  # bounded: forget endpoints that are not in the pool
                live = self.datastore.states
                self._removals = rem = {k: v for k, v in rem.items() if k in live}
            for key in removed:
                rem[key] = rem.get(key, 0) + 1
        return added, removed

    def registration(self, endpoint: str) -> int:
        """Which registration of ``endpoint`` is current (a count of its removals)."""
        return self._removals.get(endpoint, 0)

    def _on_metrics(self, state: EndpointState, became_fresh: bool) -> None:
        """Datastore listener: keep the endpoint's view current; a newly fresh endpoint changes the pool."""
        view = self._cands.get(state)
        if view is not None:
            view.metrics = state.metrics
        if became_fresh:
            self._pool = None

    def _pool_candidates(self, now: float) -> list[Candidate]:
        """The fresh candidates of the whole pool (a new list each time: plugins may keep or reorder it).

        The list is rebuilt only when it may be wrong: the endpoint set changed (datastore version), an
        endpoint became fresh (listener), or the oldest included scrape passed the staleness threshold. In
        between, the metrics listener keeps each view's snapshot current, so a pick costs one list copy
        instead of a pass over every endpoint."""
        ds = self.datastore
        staleness = ds.staleness
        pool = self._pool
        if pool is None or self._pool_version != ds.version or now - self._pool_oldest > staleness:
            pool = self._candidates(ds.states.values(), now, staleness)
            oldest = now
            for s in ds.states.values():
                last = s.last_ok
                if last is not None and last < oldest and now - last <= staleness:
                    oldest = last
            self._pool_oldest = oldest
            self._pool, self._pool_version = pool, ds.version
        return list(pool)

    def _candidates(
        self,
        states: Iterable[EndpointState],
        now: float,
        staleness: float | None,
    ) -> list[Candidate]:
        """Scheduling views of the ``states`` scraped within ``staleness`` seconds (all of them when None),
        in one pass. Views are reused across picks; only the metrics snapshot pointer is refreshed."""
        cache = self._cands
        out: list[Candidate] = []
        append = out.append
        for s in states:
            if staleness is not None:
                last = s.last_ok
                if last is None or now - last > staleness:
                    continue
            c = cache.get(s)
            if c is None:
                c = cache[s] = Candidate(s.key, s.endpoint.name, s.metrics, labels=s.endpoint.labels)
            else:
                c.metrics = s.metrics
            append(c)
        if len(cache) > 2 * len(self.datastore.states) + 16:  # endpoints came and went: drop the dead
            live = self.datastore.states
            for dead in [st for st in cache if live.get(st.key) is not st]:
                del cache[dead]
        return out

    def _observe_prefix(self, ctx: CycleContext, result: ProfileResult) -> None:
        hashes = ctx.hashes_computed
        if not hashes:
            return
        matched = ctx.matched_blocks(result.endpoints[0].key)
        self.metrics.prefix_hit_ratio.observe(matched / len(hashes))
        block_bytes = ctx.block_size_tokens([result.endpoints[0]]) * CHARS_PER_TOKEN
        self.metrics.prefix_hit_bytes.observe(min(matched * block_bytes, len(ctx.request.prompt)))
        self.metrics.prefix_indexer_size.set(ctx.learned.size())

    def _bodyless(self, request: PickRequest) -> Decision:
        """GIE: a request without a body (``GET /v1/models``) goes to a random fresh endpoint."""
        states = list(self.datastore.states.values())
        if request.subset is not None:
            states = match_subset(states, request.subset)
        now = self.clock.now()
        fresh = [s for s in states if s.fresh(now, self.datastore.staleness)] or states
        if not fresh:
            return self._reject(503, "no ready endpoints in the pool", "no-endpoints")
        return Destination((self.rng.choice(fresh).key,))


class Session:
    """Response-phase accounting for one picked request (implements :class:`~inferoute.picking.PickSession`).

    Never raises; only the first ``response_finished`` / ``aborted`` counts.
    """

    __slots__ = (
        "_director",
        "_done",
        "_first",
        "_reg",
        "_series",
        "_started_at",
        "_tail",
        "endpoint",
        "prefill_tokens",
        "prompt_tokens",
        "status",
        "usage",
    )

    def __init__(
        self,
        director: Director,
        series: ModelSeries,
        endpoint: str,
        prompt_tokens: int,
        prefill_tokens: int,
        started_at: float,
    ) -> None:
        self._director = director
        self._series = series
        self._reg = director.registration(endpoint)
        """The registration of ``endpoint`` the in-flight count was taken on."""
        self.endpoint = endpoint
        """Where the in-flight count is held: the primary pick, moved to the served endpoint when reported."""
        self.prompt_tokens = prompt_tokens
        self.prefill_tokens = prefill_tokens
        """Tokens the endpoint is expected to prefill (prompt minus its probable prefix-cache hit)."""
        self._started_at = started_at
        self._tail = TailBuffer()
        self._first = False
        self._done = False
        self.status = 0
        self.usage: Usage | None = None

    def response_started(self, served: str, status: int, headers: Mapping[str, str]) -> None:
        if self._done:
            return
        try:
            self.status = status
            if served and served != self.endpoint:
                d = self._director
                moved = Finished(self.endpoint, self.prompt_tokens, self.prefill_tokens, started=False)
                self.prefill_tokens = self.prompt_tokens  # the fallback's cache is unknown: assume cold
                started = Started(served, self.prompt_tokens, self.prefill_tokens)
                d.learned.apply((moved, started) if self._current() else (started,))
                self.endpoint = served
                self._reg = d.registration(served)
        except Exception:
            log.exception("session response_started")

    def response_chunk(self, chunk: bytes) -> None:
        if self._done:
            return
        try:
            if not self._first and chunk:
                self._first = True
                d = self._director
                if self._current():
                    d.learned.apply((FirstByte(self.endpoint, self.prefill_tokens),))
                self._series.ttft.observe(d.clock.now() - self._started_at)
            self._tail.feed(chunk)
        except Exception:
            log.exception("session response_chunk")

    def response_finished(self) -> None:
        if self._done:
            return
        self._finish()
        try:
            usage = parse_usage(self._tail.data)
            self.usage = usage
            if usage is not None:
                s = self._series
                s.input_tokens.observe(usage.prompt_tokens)
                s.output_tokens.observe(usage.completion_tokens)
                s.cached_tokens.observe(usage.cached_tokens)
        except Exception:
            log.exception("session usage")

    def endpoint_failed(self, endpoint: str, reason: str) -> None:
        """Passive health: the data plane could not connect to ``endpoint`` (see
        :meth:`Datastore.mark_down <inferoute.epp.datalayer.datastore.Datastore.mark_down>`)."""
        try:
            self._director.datastore.mark_down(endpoint, reason)
        except Exception:
            log.exception("session endpoint_failed")

    def aborted(self, reason: str) -> None:
        if self._done:
            return
        self._finish()
        try:
            self._director.metrics.sessions_aborted.labels(reason).inc()
        except Exception:
            log.exception("session aborted")

    def _current(self) -> bool:
        """The endpoint has not left the pool since the count was taken (:meth:`Director.set_endpoints`)."""
        return self._director.registration(self.endpoint) == self._reg

    def _finish(self) -> None:
        self._done = True
        try:
            d = self._director
            if self._current():
                d.learned.apply(
                    (Finished(self.endpoint, self.prompt_tokens, self.prefill_tokens, self._first),)
                )
            self._series.running.dec()
            self._series.duration.observe(d.clock.now() - self._started_at)
        except Exception:
            log.exception("session finish")
