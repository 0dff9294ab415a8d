"""``session-affinity-scorer``: keep a session on the endpoint that served it before.

Formula: 1.0 for the endpoint bound to the request's session, 0 for the others (all 0 without a binding).
Input: the session id header (default ``x-session-id``); after each pick the session is bound to the picked
endpoint for ``ttlSeconds`` (refreshed on every request of the session), as llm-d's session affinity does.
Parameters: ``headerName`` (default ``x-session-id``), ``ttlSeconds`` (default 300), ``maxSessions``
(default 100000; the oldest binding is dropped beyond it).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import ClassVar

from inferoute.clock import Clock
from inferoute.epp.plugin import Params, PluginDeps
from inferoute.epp.scheduling.types import Candidate, CycleContext

TYPE = "session-affinity-scorer"
ROLE = "scorer"


class SessionAffinityScorer:
    type_name: ClassVar[str] = TYPE

    def __init__(
        self,
        name: str,
        clock: Clock,
        *,
        header: str = "x-session-id",
        ttl: float = 300.0,
        max_sessions: int = 100_000,
    ) -> None:
        self.name = name
        self.clock = clock
        self.header = header.lower()
        self.ttl = ttl
        self.max_sessions = max_sessions
        self._bindings: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def bound(self, session: str) -> str | None:
        entry = self._bindings.get(session)
        if entry is None:
            return None
        endpoint, expires = entry
        if expires < self.clock.now():
            del self._bindings[session]
            return None
        return endpoint

    def score(self, ctx: CycleContext, candidates: Sequence[Candidate]) -> list[float]:
        session = ctx.request.headers.get(self.header)
        target = self.bound(session) if session else None
        return [1.0 if c.key == target else 0.0 for c in candidates]

    def on_picked(self, ctx: CycleContext, picked: Candidate, candidates: Sequence[Candidate]) -> None:
        session = ctx.request.headers.get(self.header)
        if not session:
            return
        self._bindings[session] = (picked.key, self.clock.now() + self.ttl)
        self._bindings.move_to_end(session)
        while len(self._bindings) > self.max_sessions:
            self._bindings.popitem(last=False)


def create(name: str, params: Params, deps: PluginDeps) -> SessionAffinityScorer:
    return SessionAffinityScorer(
        name,
        deps.clock,
        header=params.text("headerName", "x-session-id"),
        ttl=params.number("ttlSeconds", 300.0, minimum=0.001),
        max_sessions=params.integer("maxSessions", 100_000, minimum=1),
    )
