"""In-flight load shared across picker workers and replicas (llm-d-router's ``inflight-load-producer``
contribution to its ``CrossReplicaSyncer``).

:class:`SyncedLearnedState` is the local learned state whose in-flight view per endpoint is *this process's
live counts plus the other replicas' latest published counts*. Every sync interval it supplies its own counts
(``set("inflight", endpoint, (requests, pending, pending_tokens, tokens))``; endpoints at zero are deleted)
and takes the sum of the peers' values. The scorers read the same in-place objects as before, so nothing
else changes; the peers' part is at most one interval (200 ms by default) old.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from inferoute.epp.learned import InflightCounts, LocalLearnedState
from inferoute.epp.scheduling.prefix import PrefixIndex
from inferoute.epp.sync.syncer import DEFAULT_INTERVAL, CrossReplicaSyncer, run_syncer

KEY = "inflight"
_ZERO = (0, 0, 0, 0)


def _sum(values: list[Any]) -> tuple[int, int, int, int]:
    r = p = pt = t = 0
    for v in values:
        try:
            a, b, c, d = v
            r, p, pt, t = r + int(a), p + int(b), pt + int(c), t + int(d)
        except (TypeError, ValueError):
            continue  # another version's value: ignore rather than fail every pick
    return r, p, pt, t


class SyncedLearnedState(LocalLearnedState):
    """:class:`LocalLearnedState` plus the peers' in-flight counts from ``syncer``."""

    def __init__(self, syncer: CrossReplicaSyncer, prefix: PrefixIndex | None = None) -> None:
        super().__init__(prefix)
        self.syncer = syncer
        self._shown: dict[str, InflightCounts] = {}
        self._remote: dict[str, tuple[int, int, int, int]] = {}

    def inflight(self, endpoint: str) -> InflightCounts:
        shown = self._shown.get(endpoint)
        if shown is None:
            shown = self._shown[endpoint] = InflightCounts()
            self._refresh(endpoint)
        return shown

    def local_inflight(self, endpoint: str) -> InflightCounts:
        """This process's own counts."""
        return self._counts(endpoint)

    def _refresh(self, endpoint: str) -> None:
        shown = self._shown.get(endpoint)
        if shown is None:
            return
        c = self._counts(endpoint)
        r, p, pt, t = self._remote.get(endpoint, _ZERO)
        shown.requests, shown.pending = c.requests + r, c.pending + p
        shown.pending_tokens, shown.tokens = c.pending_tokens + pt, c.tokens + t

    def begin(self, endpoint: str, prompt_tokens: int, prefill_tokens: int) -> None:
        super().begin(endpoint, prompt_tokens, prefill_tokens)
        self._refresh(endpoint)

    def first_byte(self, endpoint: str, prefill_tokens: int) -> None:
        super().first_byte(endpoint, prefill_tokens)
        self._refresh(endpoint)

    def end(self, endpoint: str, prompt_tokens: int, prefill_tokens: int, *, started: bool) -> None:
        super().end(endpoint, prompt_tokens, prefill_tokens, started=started)
        self._refresh(endpoint)

    def forget_endpoints(self, endpoints: Iterable[str]) -> None:
        endpoints = list(endpoints)
        super().forget_endpoints(endpoints)
        for ep in endpoints:
            self._remote.pop(ep, None)
            self.syncer.delete(KEY, ep)
            self._refresh(ep)

    def supply(self) -> None:
        """Publish this process's counts (before an exchange)."""
        for ep, c in self._inflight.items():
            if c.requests or c.pending:
                self.syncer.set(KEY, ep, (c.requests, c.pending, c.pending_tokens, c.tokens))
            else:
                self.syncer.delete(KEY, ep)

    def apply(self) -> None:
        """Take the peers' sums (after an exchange)."""
        remote: dict[str, tuple[int, int, int, int]] = {}
        for ep in set(self._shown) | set(self._remote):
            total = self.syncer.get(KEY, ep, _sum)
            if total != _ZERO:
                remote[ep] = total
        self._remote = remote
        for ep in self._shown:
            self._refresh(ep)

    async def run(self, interval: float = DEFAULT_INTERVAL) -> None:
        """Sync every ``interval`` seconds until cancelled."""
        await run_syncer(self.syncer, interval, self.supply, self.apply)
