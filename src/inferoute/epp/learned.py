"""Learned state: what the picker knows from its own decisions, behind one interface.

Two things are learned rather than scraped:

* the **prefix index** — which endpoint probably holds which prompt prefix in its KV cache
  (:class:`~inferoute.epp.scheduling.prefix.PrefixIndex`), and
* **in-flight accounting** — requests and tokens the picker sent to each endpoint that have not finished yet.
  Scrapes arrive every 50 ms; a burst of picks inside one interval would all see the same queue length, so
  scorers add what we know we sent since.

Everything goes through :class:`LearnedState`, so an implementation fed by model-server KV events or shared
across picker processes can replace :class:`LocalLearnedState` without touching scorers or the director.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from inferoute.epp.scheduling.prefix import PrefixIndex


class InflightCounts:
    """In-flight load this picker placed on one endpoint."""

    __slots__ = ("pending", "pending_tokens", "requests", "tokens")

    def __init__(self) -> None:
        self.requests = 0
        """Picked and not finished."""
        self.pending = 0
        """Picked and no response byte yet (queued or prefilling)."""
        self.pending_tokens = 0
        """Prompt tokens the pending requests still have to prefill there (the uncached part)."""
        self.tokens = 0
        """Prompt tokens (estimate) of the unfinished requests."""


class LearnedState(Protocol):
    prefix: PrefixIndex

    def inflight(self, endpoint: str) -> InflightCounts:
        """The live counts object of ``endpoint`` (updated in place; callers may keep it)."""
        ...

    def begin(self, endpoint: str, prompt_tokens: int, prefill_tokens: int) -> None:
        """A request of ``prompt_tokens`` was sent to ``endpoint``, which must prefill ``prefill_tokens`` of
        them (the rest is expected in its prefix cache)."""
        ...

    def first_byte(self, endpoint: str, prefill_tokens: int) -> None:
        """Its response started (prefill done)."""
        ...

    def end(self, endpoint: str, prompt_tokens: int, prefill_tokens: int, *, started: bool) -> None:
        """It finished or was aborted; ``started`` says whether ``first_byte`` was reported."""
        ...

    def learn_prefix(self, endpoint: str, hashes: Sequence[int], tokens_per_block: int) -> None:
        """``endpoint`` now caches these prefix blocks, each standing for ``tokens_per_block`` tokens."""
        ...

    def forget_endpoints(self, endpoints: Iterable[str]) -> None: ...


class LocalLearnedState:
    """In-process learned state (one picker process)."""

    def __init__(self, prefix: PrefixIndex | None = None) -> None:
        self.prefix = prefix or PrefixIndex()
        self._inflight: dict[str, InflightCounts] = {}

    def inflight(self, endpoint: str) -> InflightCounts:
        return self._counts(endpoint)

    def _counts(self, endpoint: str) -> InflightCounts:
        c = self._inflight.get(endpoint)
        if c is None:
            c = self._inflight[endpoint] = InflightCounts()
        return c

    def begin(self, endpoint: str, prompt_tokens: int, prefill_tokens: int) -> None:
        c = self._counts(endpoint)
        c.requests += 1
        c.pending += 1
        c.pending_tokens += prefill_tokens
        c.tokens += prompt_tokens

    def first_byte(self, endpoint: str, prefill_tokens: int) -> None:
        c = self._counts(endpoint)
        c.pending = max(0, c.pending - 1)
        c.pending_tokens = max(0, c.pending_tokens - prefill_tokens)

    def end(self, endpoint: str, prompt_tokens: int, prefill_tokens: int, *, started: bool) -> None:
        c = self._inflight.get(endpoint)
        if c is None:
            return
        if not started:
            c.pending = max(0, c.pending - 1)
            c.pending_tokens = max(0, c.pending_tokens - prefill_tokens)
        c.requests = max(0, c.requests - 1)
        c.tokens = max(0, c.tokens - prompt_tokens)
        if c.requests == 0:
            c.tokens = 0
            c.pending = 0
            c.pending_tokens = 0

    def learn_prefix(self, endpoint: str, hashes: Sequence[int], tokens_per_block: int) -> None:
        self.prefix.add(endpoint, hashes, tokens_per_block)

    def forget_endpoints(self, endpoints: Iterable[str]) -> None:
        for ep in endpoints:
            self._inflight.pop(ep, None)
            self.prefix.remove_endpoint(ep)
