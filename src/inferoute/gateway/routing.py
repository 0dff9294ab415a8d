"""The decision core shared by the gateway and the NGINX decider: BBR, then the picker, then validation.

:class:`RequestRouter` turns one request (method, path, headers, fully read body) into a
:class:`RoutedRequest`: the headers to forward (client routing headers stripped, the model header and the
picker's mutations set), the ordered upstream list (pool endpoints / allowed CIDRs only), an optional
replacement body and the :class:`~inferoute.picking.PickSession` that the caller MUST end. Every failure is an
:class:`~inferoute.errors.InferouteError` with the status the client must see and a ``cause`` for metrics:

=========================  ======  ==================================================================
cause                      status  when
=========================  ======  ==================================================================
body-too-large             413     body longer than ``bbr.max_body_size``
picker-reject (or the      429 /   the picker answered ImmediateResponse (status and body passed through,
picker's own cause)        503 ..  see :class:`PickerRejected`)
picker-timeout             504     picker timed out, fail-closed
tls / unavailable /        502     picker unreachable, TLS failure, protocol error, fail-closed
protocol / picker-error
no-destination             502     picker answered without any endpoint, fail-closed
invalid-destination        502     picker returned an endpoint outside the pool / allowed CIDRs (always)
bbr-timeout / bbr-error    504/502 remote BBR failed and ``bbr.failure_mode_allow`` is false
no-endpoints               503     fail-open (or EPP disabled) with no default_upstream and an empty pool
=========================  ======  ==================================================================

Fail-open (``epp.failure_mode_allow``) sends the request to ``default_upstream``, else to a pool endpoint
(round robin), and reports the swallowed failure in :attr:`RoutedRequest.picker_error` so it is still counted.

The decider never touches sockets itself: pickers and the remote BBR client are injected, time is an injected
:class:`~inferoute.clock.Clock`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from inferoute.clock import Clock, SystemClock
from inferoute.endpoints import Endpoint
from inferoute.epp.requestcontrol.parse import BodyParse, BodyParser
from inferoute.errors import InferouteError
from inferoute.gateway.bbr import is_header_safe, model_or_default, too_large
from inferoute.gateway.config import RouteConfig
from inferoute.gateway.destinations import AllowList, is_routing_header, split_destinations, strip_headers
from inferoute.picking import Destination, NullSession, Picker, PickerError, PickRequest, PickSession, Reject

log = logging.getLogger(__name__)

_PICKER_FAILURES = {
    "tls": "the endpoint picker failed: TLS verification or handshake failed",
    "unavailable": "the endpoint picker is unavailable",
    "protocol": "the endpoint picker failed: protocol error",
    "no-destination": "the endpoint picker answered without a destination endpoint",
}
"""The client-facing message per failure class (the details go to the log with the request id)."""


class ModelExtractor(Protocol):
    """A remote BBR client (:class:`inferoute.extproc.bbr_client.RemoteBBR` satisfies it)."""

    async def model_header(self, headers: Mapping[str, str], body: bytes) -> str | None: ...


@dataclass(slots=True)
class PickerRejected(InferouteError):
    """The picker answered the client directly (ext_proc ImmediateResponse): its status, body and headers."""

    raw_body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)

    def body(self) -> bytes:
        return self.raw_body or InferouteError.body(self)


@dataclass(slots=True)
class RoutedRequest:
    """Everything a data plane needs to forward one request."""

    route: RouteConfig
    model: str | None
    """The model header value set on the request (None: body-less request or BBR off)."""
    upstreams: tuple[str, ...]
    """Ordered ``ip:port`` list, every one allowed; walk it on connect errors and 5xx before the
    first byte."""
    headers: list[tuple[str, str]]
    """Client headers with routing headers stripped and ``set_headers`` applied (replacing
    same-named ones)."""
    set_headers: dict[str, str]
    """Headers the gateway sets (model header, picker mutations), original case."""
    body: bytes
    """The body to send (the picker's replacement if it gave one)."""
    session: PickSession
    source: str
    """``picker`` | ``fail-open`` | ``static`` (EPP disabled)."""
    picker_error: str | None = None
    """Cause of a picker failure that fail-open swallowed (count it)."""
    bbr_error: str | None = None
    """Cause of a remote-BBR failure that its fail-open swallowed."""
    bbr_seconds: float = 0.0
    picker_seconds: float = 0.0
    restore_model: tuple[str, str] | None = None
    """``(target, asked)``: the picker rewrote the model; the answer's ``model`` fields get ``asked`` back."""
    app_protocol: str = "http"
    """``http`` or ``h2c``: how the upstreams are spoken to (the pool's or backend's ``app_protocol``)."""

    def upstream_headers(self, upstream: str) -> list[tuple[str, str]]:
        """Headers for an attempt at ``upstream``: :attr:`headers` plus the EPP header naming the upstream
        (what NGINX exposes as ``$inference_upstream``)."""
        name = self.route.epp.header_name
        return [*self.headers, (name, upstream)]


def apply_headers(headers: Iterable[tuple[str, str]], updates: Mapping[str, str]) -> list[tuple[str, str]]:
    """``headers`` with every name in ``updates`` replaced (case-insensitive) by its new value."""
    drop = {k.lower() for k in updates}
    out = [(k, v) for k, v in headers if k.lower() not in drop]
    out.extend(updates.items())
    return out


class RequestRouter:
    """BBR + picker + destination validation for one route (see module docstring)."""

    def __init__(
        self,
        route: RouteConfig,
        pool: Sequence[Endpoint],
        picker: Picker | None,
        *,
        allow: AllowList,
        routing_headers: frozenset[str],
        untrusted: frozenset[str] = frozenset(),
        remote_bbr: ModelExtractor | None = None,
        clock: Clock | None = None,
        body_parser: BodyParser | None = None,
        app_protocol: str = "http",
    ) -> None:
        self.route = route
        self.app_protocol = app_protocol
        self.pool = tuple(pool)
        self.picker = picker if route.epp.enabled else None
        self.allow = allow
        self.routing_headers = routing_headers
        self.client_stripped = routing_headers | untrusted
        """Removed from client requests: routing headers and, unless the route trusts its clients, the
        picker-control headers (``untrusted``); picker mutations may still set the latter."""
        self.remote_bbr = remote_bbr if route.bbr.endpoint else None
        self.clock = clock or SystemClock()
        self.body_parser = body_parser or BodyParser()
        """In-process BBR's parser; one per process, shared by its routes (its buffers grow to the largest
        body seen). Its result goes on to the picker, which then does not parse the body again."""
        self._rr = 0
        self._keys = tuple(e.key for e in self.pool)

    async def decide(
        self,
        method: str,
        path: str,
        headers: Iterable[tuple[str, str]],
        body: bytes,
        request_id: str = "",
    ) -> RoutedRequest:
        """Decide where one request goes. Raises :class:`InferouteError` (see the module table)."""
        route = self.route
        if route.bbr.enabled and len(body) > route.bbr.max_body_size:
            raise too_large(route.bbr.max_body_size, len(body))
        stripped = strip_headers(headers, self.client_stripped)
        set_headers: dict[str, str] = {}
        model: str | None = None
        bbr_error: str | None = None
        parsed: BodyParse = None
        t0 = self.clock.now()
        if route.bbr.enabled:
            model, bbr_error, parsed = await self._model(stripped, body)
            if model is not None:
                set_headers[route.bbr.header_name] = model
        t1 = self.clock.now()
        fwd = apply_headers(stripped, set_headers) if set_headers else stripped
        routed = RoutedRequest(
            route,
            model,
            (),
            fwd,
            set_headers,
            body,
            NullSession(),
            "static",
            bbr_error=bbr_error,
            app_protocol=self.app_protocol,
        )
        routed.bbr_seconds = t1 - t0
        if self.picker is None:
            routed.upstreams = self._fallback_upstreams()
            return routed
        full_duplex = route.epp.body == "full_duplex"
        request = PickRequest(
            method=method,
            path=path,
            headers={k.lower(): v for k, v in fwd},
            request_id=request_id,
            body=body if full_duplex else b"",
            model=model,
            parsed=parsed if full_duplex else None,
        )
        return await self._pick(self.picker, request, routed)

    async def _pick(self, picker: Picker, request: PickRequest, routed: RoutedRequest) -> RoutedRequest:
        """Ask the picker and complete ``routed`` with its answer (fail-open on a picker failure)."""
        t1 = self.clock.now()
        try:
            decision, session = await picker.pick(request)
        except PickerError as exc:
            return self._picker_failed(exc, routed, self.clock.now() - t1, request.request_id)
        picker_seconds = self.clock.now() - t1
        if isinstance(decision, Reject):
            session.aborted("picker-reject")
            raise PickerRejected(
                decision.status,
                _reject_message(decision),
                cause=decision.cause,
                raw_body=decision.body,
                headers=dict(decision.headers),
            )
        assert isinstance(decision, Destination)
        try:
            upstreams = tuple(self.allow.check(v) for v in split_destinations(decision.walk))
        except InferouteError as exc:
            session.aborted("invalid-destination")
            log.warning("route %s: %s", self.route.path, exc.message)
            raise
        if not upstreams:
            session.aborted("no-destination")
            empty = PickerError(
                "the endpoint picker answered without a destination endpoint", cause="no-destination"
            )
            return self._picker_failed(empty, routed, picker_seconds, request.request_id)
        if decision.set_headers:
            mutations = self._mutations(decision.set_headers)
            routed.set_headers.update(mutations)
            routed.headers = apply_headers(routed.headers, mutations)
        if decision.body is not None:
            routed.body = decision.body
        routed.restore_model = decision.restore_model
        routed.upstreams = upstreams
        routed.session = session
        routed.source = "picker"
        routed.picker_seconds = picker_seconds
        return routed

    def _mutations(self, requested: Mapping[str, str]) -> dict[str, str]:
        """The picker's header mutations minus routing headers (never taken from a picker's mutation: the
        destination comes from the decision itself) and values that cannot be sent (control characters)."""
        out: dict[str, str] = {}
        epp_header = self.route.epp.header_name.lower()
        for k, v in requested.items():
            lk = k.lower()
            if is_routing_header(lk, self.routing_headers) or lk == epp_header:
                continue
            if not is_header_safe(k) or not is_header_safe(v) or not k:
                log.warning(
                    "route %s: dropping an invalid header mutation from the picker: %r", self.route.path, k
                )
                continue
            out[k] = v
        return out

    async def _model(
        self, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[str | None, str | None, BodyParse]:
        """The model header value, the swallowed BBR failure's cause, and the in-process parse of the body."""
        bbr = self.route.bbr
        if not body:
            return None, None, None
        if self.remote_bbr is None:
            ctype = next((v for k, v in headers if k.lower() == "content-type"), None)
            model, parsed = model_or_default(body, ctype, bbr.default_model, self.body_parser)
            return model, None, parsed
        try:
            model = await self.remote_bbr.model_header({k.lower(): v for k, v in headers}, body)
        except PickerError as exc:
            cause = "bbr-timeout" if exc.timeout else "bbr-error"
            log.warning("route %s: remote BBR %s failed: %s", self.route.path, bbr.endpoint, exc)
            if bbr.failure_mode_allow:
                return bbr.default_model, cause, None
            if exc.timeout:
                raise InferouteError(
                    504, f"body-based routing timed out after {bbr.timeout_ms} ms", cause=cause
                ) from exc
            # the class of failure only: the BBR server's address and TLS details are in the log line above
            msg = f"body-based routing failed ({exc.cause or 'error'})"
            raise InferouteError(502, msg, cause=cause) from exc
        if model is not None and not is_header_safe(model):
            log.warning(
                "route %s: remote BBR returned a model with control characters: %r", self.route.path, model
            )
            if bbr.failure_mode_allow:
                return bbr.default_model, "bbr-error", None
            raise InferouteError(
                502, "body-based routing returned an invalid model header", cause="bbr-error"
            )
        return (model or bbr.default_model), None, None

    def _picker_failed(
        self, exc: PickerError, routed: RoutedRequest, picker_seconds: float, request_id: str = ""
    ) -> RoutedRequest:
        epp = self.route.epp
        cause = "picker-timeout" if exc.timeout else (exc.cause or "picker-error")
        log.warning(
            "route %s: endpoint picker %s failed (%s), request %s: %s",
            self.route.path,
            epp.endpoint,
            cause,
            request_id or "-",
            exc,
        )
        if not epp.failure_mode_allow:
            if exc.timeout:
                raise InferouteError(
                    504, f"the endpoint picker timed out after {epp.timeout_ms} ms", cause=cause
                ) from exc
            # The class of failure only: addresses and TLS details are in the log line above.
            raise InferouteError(
                502, _PICKER_FAILURES.get(cause, "the endpoint picker failed"), cause=cause
            ) from exc
        routed.upstreams = self._fallback_upstreams()
        routed.source = "fail-open"
        routed.picker_error = cause
        routed.picker_seconds = picker_seconds
        return routed

    def _fallback_upstreams(self) -> tuple[str, ...]:
        """``default_upstream``, else the pool in round-robin order (the rest as fallbacks)."""
        if self.route.default_upstream:
            return (self.allow.normalize(self.route.default_upstream),)
        if not self.pool:
            raise InferouteError(
                503,
                "no endpoint available: the pool is empty and no default_upstream is set",
                cause="no-endpoints",
            )
        i = self._rr % len(self.pool)
        self._rr += 1
        keys = self._keys
        return keys[i:] + keys[:i]


def _reject_message(r: Reject) -> str:
    text = r.body[:200].decode("utf-8", "replace") if r.body else ""
    return text or f"rejected by the endpoint picker ({r.status})"
