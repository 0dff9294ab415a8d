"""A small, deterministic Picker for protocol tests, interop tests and the ext_proc benchmark.

:class:`RecordingPicker` behaves like GIE's conformance picker (lwepp): round robin over a fixed
endpoint list, steerable by the request header ``test-epp-endpoint-selection: ip[,ip:port...]`` (every
matching endpoint, in the header's order, becomes the destination list), restricted by the subset hint
(``ip`` or ``ip:port`` tokens; nothing eligible -> 503). It records every session event so tests can assert
the response phase.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from inferoute.endpoints import split_hostport
from inferoute.errors import error_body
from inferoute.picking import Decision, Destination, PickerError, PickRequest, PickSession, Reject

SELECTION_HEADER = "test-epp-endpoint-selection"
REJECT_HEADER = "test-epp-reject"
"""``test-epp-reject: 429`` makes the picker answer that status (tests of ImmediateResponse)."""
FAIL_HEADER = "test-epp-fail"
"""Any value makes :meth:`RecordingPicker.pick` raise PickerError (tests of the gRPC failure path)."""


@dataclass(slots=True)
class SessionLog:
    """What the data plane reported for one picked request."""

    request: PickRequest
    decision: Decision
    served: str | None = None
    status: int | None = None
    chunks: list[bytes] = field(default_factory=list)
    finished: bool = False
    aborted: str | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)


class _Session:
    __slots__ = ("_log",)

    def __init__(self, log: SessionLog) -> None:
        self._log = log

    def response_started(self, served: str, status: int, headers: Mapping[str, str]) -> None:
        self._log.served, self._log.status = served, status

    def response_chunk(self, chunk: bytes) -> None:
        self._log.chunks.append(chunk)

    def response_finished(self) -> None:
        if not self._log.ended.is_set():
            self._log.finished = True
            self._log.ended.set()

    def aborted(self, reason: str) -> None:
        if not self._log.ended.is_set():
            self._log.aborted = reason
            self._log.ended.set()


def _matches(token: str, endpoint: str) -> bool:
    host, port = split_hostport(token)
    ep_host, ep_port = split_hostport(endpoint)
    return host == ep_host and (port is None or port == ep_port)


class RecordingPicker:
    """Round-robin picker over ``endpoints`` (``ip:port``) that records sessions (see module docstring)."""

    def __init__(
        self, endpoints: Sequence[str], *, delay: float = 0.0, record: bool = True, ready: bool = True
    ) -> None:
        self.endpoints = list(endpoints)
        self.delay = delay
        self.record = record
        self.is_ready = ready
        self.sessions: list[SessionLog] = []
        self._next = 0

    def ready(self) -> bool:
        return self.is_ready

    def choose(self, request: PickRequest) -> Decision:
        """The pure decision (no I/O)."""
        h = request.headers
        if REJECT_HEADER in h:
            status = int(h[REJECT_HEADER])
            return Reject(status, error_body(status, "rejected by test picker"), cause="test-reject")
        candidates = self.endpoints
        if request.subset is not None:
            candidates = [e for e in candidates if any(_matches(t, e) for t in request.subset)]
            if not candidates:
                return Reject(
                    503, error_body(503, "no endpoint in the subset hint is eligible"), cause="subset"
                )
        selection = h.get(SELECTION_HEADER)
        if selection:
            chosen = [
                e for t in selection.split(",") if t.strip() for e in candidates if _matches(t.strip(), e)
            ]
            if not chosen:
                return Reject(503, error_body(503, f"no endpoint matches {selection!r}"), cause="selection")
            return Destination(tuple(dict.fromkeys(chosen)))
        if not candidates:
            return Reject(503, error_body(503, "no ready endpoints"), cause="no-endpoints")
        ep = candidates[self._next % len(candidates)]
        self._next += 1
        return Destination((ep,))

    async def pick(self, request: PickRequest) -> tuple[Decision, PickSession]:
        if FAIL_HEADER in request.headers:
            raise PickerError("test picker asked to fail", cause="test-failure")
        if self.delay:
            await asyncio.sleep(self.delay)
        decision = self.choose(request)
        log = SessionLog(request, decision)
        if self.record:
            self.sessions.append(log)
        return decision, _Session(log)

    async def aclose(self) -> None:
        return None
