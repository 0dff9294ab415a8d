"""The contract between a data plane and an endpoint picker.

A data plane (our gateway, the NGINX decider) asks a :class:`Picker` where a request should go. Two pickers
implement it: the embedded one (the EPP's director called in process, no gRPC hop) and the ext_proc client
(the Endpoint Picker Protocol over gRPC to ``inferoute epp``, Envoy's way). The data plane cannot tell them
apart.

Lifecycle of one request::

    decision, session = await picker.pick(request)
    # decision is a Destination (ordered ip:port list) or a Reject (status + OpenAI JSON body)
    session.response_started(served="10.0.0.7:8000", status=200, headers={...})
    session.response_chunk(b"data: ...")          # zero or more
    session.response_finished()                     # or session.aborted("client-disconnect")

Session methods are synchronous and never raise: they only record or enqueue. Exactly one of
``response_finished`` / ``aborted`` ends a session; later calls are ignored. The picker's in-flight accounting
is released there, so a data plane MUST end every session it was given (even after a Reject).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from inferoute.epp.requestcontrol.parse import BodyParse

# Header and metadata names of the Endpoint Picker Protocol.
DESTINATION_HEADER = "x-gateway-destination-endpoint"
DESTINATION_SERVED_KEY = "x-gateway-destination-endpoint-served"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
LB_NAMESPACE = "envoy.lb"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
MODEL_HEADER = "x-gateway-model-name"
RESTORE_NAMESPACE = "inferoute.model"
"""Dynamic-metadata namespace of a decision's :attr:`Destination.restore_model` (keys ``served``, ``asked``):
how ``inferoute epp`` tells a gateway that reports response bodies without echoing them which name to put
back."""
EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
"""The gRPC service the protocol rides on; pickers also report their readiness under this health name."""
FALLBACKS_KEY = "x-inferoute-destination-endpoint-fallbacks"
"""inferoute's extension: in the decision's ``envoy.lb`` dynamic metadata, the comma-separated endpoints the
picker adds after the scheduled ones (:attr:`Destination.fallbacks`); Envoy ignores it."""
FAILED_ENDPOINTS_KEY = "x-inferoute-destination-endpoint-failed"
"""inferoute's extension of the protocol (passive health): in the ``envoy.lb`` metadata of the
response-headers message, the comma-separated endpoints the data plane could not connect to before one
answered (or before it gave up: then the response headers carry the 502 it answered)."""
MAX_MODEL_NAME_CHARS = 256
"""Longest model name (body ``model`` or a rewrite target) accepted; a longer one is answered 400
``bad-model`` by the picker and by the gateway's BBR (Hugging Face ids are at most 96 + 96 characters)."""


@dataclass(slots=True)
class PickRequest:
    """What the data plane knows about a request when it asks for a destination."""

    method: str
    path: str
    headers: Mapping[str, str]
    """Request headers, lower-case names, client-supplied routing headers already stripped."""
    body: bytes = b""
    request_id: str = ""
    subset: tuple[str, ...] | None = None
    """Endpoint subset hint (``ip`` or ``ip:port`` tokens); None means the whole pool."""
    model: str | None = None
    """The model if the data plane already extracted it (BBR); the picker may re-read the body."""
    parsed: BodyParse = None
    """The data plane's parse of ``body`` (in-process BBR) or the 400 it gave; an embedded picker uses it
    instead of parsing the body a second time. None: the data plane did not parse the body."""


@dataclass(frozen=True, slots=True)
class Destination:
    """Send the request to ``endpoints[0]``; the rest are ordered fallbacks."""

    endpoints: tuple[str, ...]
    set_headers: Mapping[str, str] = field(default_factory=dict)
    """Extra request headers the picker asks for (header mutation), lower-case names."""
    body: bytes | None = None
    """A replacement request body (e.g. a rewritten model); None when unchanged."""
    restore_model: tuple[str, str] | None = None
    """``(target, asked)`` after a model rewrite: the response's ``model`` fields name ``target`` and the data
    plane puts ``asked`` back (:class:`~inferoute.epp.requestcontrol.restore.ModelRestorer`); None: no
    rewrite, the response passes untouched."""
    fallbacks: tuple[str, ...] = ()
    """Further endpoints the picker adds after the scheduled ones, so that a dead replica costs a fallback
    instead of a 502 (sent after ``endpoints`` in the destination header)."""

    @property
    def walk(self) -> tuple[str, ...]:
        """Every endpoint to try, in order: the scheduled ones, then the fallbacks."""
        return self.endpoints + self.fallbacks if self.fallbacks else self.endpoints


@dataclass(frozen=True, slots=True)
class Reject:
    """Answer the client directly (ext_proc ImmediateResponse)."""

    status: int
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    cause: str = "picker-reject"


Decision = Destination | Reject


class PickSession(Protocol):
    """Response-phase reporting for one picked request (see module docstring)."""

    def response_started(self, served: str, status: int, headers: Mapping[str, str]) -> None: ...

    def response_chunk(self, chunk: bytes) -> None: ...

    def response_finished(self) -> None: ...

    def aborted(self, reason: str) -> None: ...


EVICTED_REASON = "evicted"
EVICTED_MESSAGE = "request evicted by flow control"


class EvictableSession(Protocol):
    """A session flow control may evict (``enableEviction``). The data plane that serves the request registers
    ``handler`` once it forwards it; the picker calls it (at most once) to revoke the request: the data plane
    then answers 429 ``request evicted by flow control`` with ``x-llm-d-request-dropped-reason: evicted`` if
    nothing of the answer was sent yet, or cuts the answer off, and ends the session ``aborted``."""

    def on_evict(self, handler: Callable[[], None]) -> None: ...


def evictable(session: PickSession) -> EvictableSession | None:
    """``session`` if it can be evicted, else None."""
    return session if hasattr(session, "on_evict") else None  # type: ignore[return-value]


def report_endpoint_failed(session: PickSession, endpoint: str, reason: str) -> None:
    """Tell the picker that ``endpoint`` refused or reset the connection (passive health): the session's
    ``endpoint_failed(endpoint, reason)`` when it has one (the embedded picker marks the endpoint down at
    once; the ext_proc client reports it in the response-headers metadata, :data:`FAILED_ENDPOINTS_KEY`).
    Never raises."""
    method = getattr(session, "endpoint_failed", None)
    if method is not None:
        try:
            method(endpoint, reason)
        except Exception:  # a session never fails its data plane
            logging.getLogger(__name__).exception("endpoint_failed")


class Picker(Protocol):
    async def pick(self, request: PickRequest) -> tuple[Decision, PickSession]:
        """Decide. Raises :class:`PickerError` when the picker cannot be reached or fails."""
        ...

    async def aclose(self) -> None: ...


@runtime_checkable
class ImmediatePicker(Protocol):
    """A :class:`Picker` that can often decide without awaiting anything (an in-process picker without flow
    control): the ext_proc server then answers in the same step, without a task per decision."""

    @property
    def decides_now(self) -> bool:
        """:meth:`pick_now` decides (True) or always returns None (False): then do not call it."""
        ...

    def pick_now(self, request: PickRequest) -> tuple[Decision, PickSession] | None:
        """What :meth:`Picker.pick` would return, or None (nothing done) when the decision must be awaited.
        Raises as :meth:`Picker.pick` does."""
        ...


class PickerError(Exception):
    """The picker failed (unreachable, TLS, protocol error, timeout). ``timeout`` selects 504 vs 502."""

    def __init__(self, message: str, *, timeout: bool = False, cause: str = "picker-error") -> None:
        super().__init__(message)
        self.timeout = timeout
        self.cause = cause


class NullSession:
    """A session that records nothing (used after failures and by pickers without response accounting)."""

    __slots__ = ()

    def response_started(self, served: str, status: int, headers: Mapping[str, str]) -> None:
        return None

    def response_chunk(self, chunk: bytes) -> None:
        return None

    def response_finished(self) -> None:
        return None

    def aborted(self, reason: str) -> None:
        return None
