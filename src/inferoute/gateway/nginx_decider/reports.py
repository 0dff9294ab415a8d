"""Completion reports: how the picker learns that a response NGINX carried has ended (pure, clock injected).

NGINX reports each routed request once, after the response ended or the client went away -- as headers of a
``post_action`` request or as one syslog datagram from its access log. :func:`parse_report` and
:func:`parse_syslog_report` read both forms into a :class:`CompletionReport`; :class:`PendingSessions` keeps
the picker sessions until their report arrives and hands back the ones whose report is overdue.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from inferoute.clock import Clock
from inferoute.gateway.nginx_decider.protocol import (
    REPORT_CLIENT_STATUS,
    REPORT_COMPLETION,
    REPORT_HEADER_TIME,
    REPORT_SERVED,
    REPORT_STATUS,
    SYSLOG_MARKER,
)
from inferoute.picking import PickSession

DEFAULT_COMPLETION_TIMEOUT = 900.0
"""Seconds after which a session without completion report is aborted (longer than any sane generation)."""


@dataclass(frozen=True, slots=True)
class CompletionReport:
    """What NGINX's post_action tells the decider about one finished request."""

    served: str | None
    """The ``ip:port`` that answered (last of ``$upstream_addr``), None when no upstream was reached."""
    upstream_status: int | None
    """Status from that upstream (last of ``$upstream_status``), None when it gave none (connect error)."""
    completed: bool
    """``$request_completion == "OK"``: the whole response reached the client."""
    client_status: int | None = None
    answered: bool = True
    """The served upstream sent a response header (last ``$upstream_header_time`` is not ``-``)."""

    @property
    def outcome(self) -> str:
        """``ok`` | ``incomplete`` (client went away or the stream broke) | ``upstream-error`` (no answer)."""
        if self.upstream_status is None or self.served is None or not self.answered:
            return "upstream-error"
        if not self.completed:
            return "incomplete"
        return "ok"


def _last_token(value: str | None) -> str | None:
    """Last entry of an NGINX upstream list (``a, b : c`` -> ``c``); None for empty or ``-``."""
    if not value:
        return None
    token = value.replace(" : ", ",").split(",")[-1].strip()
    return token if token and token != "-" else None


def _int_or_none(value: str | None) -> int | None:
    if value is None or not value.strip().isdigit():
        return None
    return int(value.strip())


def parse_report(headers: Mapping[str, str]) -> CompletionReport:
    """Parse the completion report's headers (names lower case). Pure; never raises."""
    served = _last_token(headers.get(REPORT_SERVED))
    status = _int_or_none(_last_token(headers.get(REPORT_STATUS)))
    if served is not None and served.startswith("unix:"):
        served = None
    return CompletionReport(
        served=served,
        upstream_status=status,
        completed=headers.get(REPORT_COMPLETION, "").strip() == "OK",
        client_status=_int_or_none(headers.get(REPORT_CLIENT_STATUS)),
        answered=_last_token(headers.get(REPORT_HEADER_TIME, "0")) is not None,
    )


def parse_syslog_report(datagram: bytes) -> tuple[str, CompletionReport] | None:
    """``(token, report)`` from one syslog datagram of NGINX's ``inference_report`` log format, None when the
    datagram is not one. Pure; never raises."""
    at = datagram.find(SYSLOG_MARKER)
    if at < 0:
        return None
    fields = datagram[at + len(SYSLOG_MARKER) :].decode("utf-8", "replace").rstrip("\r\n").split("|")
    if len(fields) != 6 or not fields[0]:
        return None
    token, served, status, header_time, completion, client_status = fields
    report = parse_report(
        {
            REPORT_SERVED: served,
            REPORT_STATUS: status,
            REPORT_HEADER_TIME: header_time,
            REPORT_COMPLETION: completion,
            REPORT_CLIENT_STATUS: client_status,
        }
    )
    return token, report


def echo_status(status: int | None) -> int:
    """The status a completion report is answered with: the client's own (NGINX logs it as ``$status``)."""
    return status if status is not None and 200 <= status <= 599 and status not in (304,) else 204


def end_session(session: PickSession, report: CompletionReport) -> str:
    """Report ``report`` to the picker session (always ends it). Returns the outcome label."""
    outcome = report.outcome
    if outcome != "upstream-error":
        assert report.served is not None and report.upstream_status is not None
        session.response_started(report.served, report.upstream_status, {})
    if outcome == "ok":
        session.response_finished()
    else:
        session.aborted(outcome)
    return outcome


class PendingSessions:
    """Picker sessions waiting for NGINX's completion report, each with a deadline. Pure; clock injected.

    Deadlines are ``now + timeout`` with a constant timeout, so insertion order is deadline order and
    expiry only looks at the oldest entries.
    """

    def __init__(self, clock: Clock, timeout: float = DEFAULT_COMPLETION_TIMEOUT) -> None:
        self.clock = clock
        self.timeout = timeout
        self._open: OrderedDict[str, tuple[float, PickSession]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._open)

    def open(self, session: PickSession) -> str:
        """Keep ``session`` until its report; returns the token NGINX echoes back."""
        token = secrets.token_hex(12)
        self._open[token] = (self.clock.now() + self.timeout, session)
        return token

    def pop(self, token: str) -> PickSession | None:
        """The session for ``token`` (removed), None if unknown or already ended."""
        entry = self._open.pop(token, None)
        return entry[1] if entry is not None else None

    def expire(self) -> list[PickSession]:
        """Remove and return the sessions whose deadline passed (the caller aborts them)."""
        now = self.clock.now()
        out = []
        while self._open:
            token, (deadline, session) = next(iter(self._open.items()))
            if deadline > now:
                break
            del self._open[token]
            out.append(session)
        return out

    def drain(self) -> list[PickSession]:
        """Remove and return every open session (shutdown)."""
        out = [s for _, s in self._open.values()]
        self._open.clear()
        return out
