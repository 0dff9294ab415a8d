"""The in-process learned state: in-flight accounting of this picker process plus one prefix store."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from inferoute.epp.learned.approx import PrefixIndex
from inferoute.epp.learned.port import (
    IDLE,
    Finished,
    FirstByte,
    Inflight,
    PrefixStore,
    Record,
    Started,
)


class LocalView:
    """One cycle's view: the in-flight table as it was (the state copies it before its next change) and the
    prefix store's matching."""

    __slots__ = ("_inflight", "_prefix")

    def __init__(self, inflight: dict[str, Inflight], prefix: PrefixStore) -> None:
        self._inflight = inflight
        self._prefix = prefix

    def inflight(self, endpoint: str) -> Inflight:
        return self._inflight.get(endpoint, IDLE)

    def match(self, keys: Sequence[int], endpoints: Iterable[str]) -> dict[str, int]:
        return self._prefix.match(keys, endpoints)

    def size(self) -> int:
        return self._prefix.size()

    def held_tokens(self, endpoint: str) -> int:
        return self._prefix.held_tokens(endpoint)


class LocalLearnedState:
    """Learned state of one picker process. ``prefix``: the approximate index unless given (any
    :class:`~inferoute.epp.learned.port.PrefixStore`)."""

    def __init__(self, prefix: PrefixStore | None = None) -> None:
        self.prefix: PrefixStore = prefix if prefix is not None else PrefixIndex()
        self._inflight: dict[str, Inflight] = {}
        self._shared = False
        """A view holds ``_inflight``: copy it before the next change (copy on write)."""

    def endpoints(self) -> list[str]:
        """The endpoints with load in flight."""
        return list(self._inflight)

    def snapshot(self) -> LocalView:
        self._shared = True
        return LocalView(self._inflight, self.prefix)

    def _table(self) -> dict[str, Inflight]:
        if self._shared:
            self._inflight = dict(self._inflight)
            self._shared = False
        return self._inflight

    def apply(self, records: Iterable[Record]) -> None:
        prefix: list[Record] = []
        for r in records:
            if isinstance(r, Started):
                t = self._table()
                c = t.get(r.endpoint, IDLE)
                t[r.endpoint] = Inflight(
                    c.requests + 1,
                    c.pending + 1,
                    c.pending_tokens + r.prefill_tokens,
                    c.tokens + r.prompt_tokens,
                )
            elif isinstance(r, FirstByte):
                self._first_byte(r)
            elif isinstance(r, Finished):
                self._finished(r)
            else:
                prefix.append(r)
        if prefix:
            self.prefix.apply(prefix)

    def _first_byte(self, r: FirstByte) -> None:
        c = self._inflight.get(r.endpoint)
        if c is None:
            return
        self._table()[r.endpoint] = Inflight(
            c.requests, max(0, c.pending - 1), max(0, c.pending_tokens - r.prefill_tokens), c.tokens
        )

    def _finished(self, r: Finished) -> None:
        c = self._inflight.get(r.endpoint)
        if c is None:
            return
        pending, pending_tokens = c.pending, c.pending_tokens
        if not r.started:
            pending, pending_tokens = max(0, pending - 1), max(0, pending_tokens - r.prefill_tokens)
        requests = max(0, c.requests - 1)
        t = self._table()
        if requests == 0:
            del t[r.endpoint]
        else:
            t[r.endpoint] = Inflight(requests, pending, pending_tokens, max(0, c.tokens - r.prompt_tokens))

    def forget_endpoints(self, endpoints: Iterable[str]) -> None:
        gone = list(endpoints)
        t = self._table()
        for ep in gone:
            t.pop(ep, None)
        self.prefix.forget(gone)
