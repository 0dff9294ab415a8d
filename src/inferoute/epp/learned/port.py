"""The learned-state port: the records that change it, the per-cycle view scheduling reads, and the two
interfaces every implementation keeps. Pure (no I/O, no clock).

Scheduling never mutates learned state. A cycle reads one :class:`LearnedView` (immutable: in-flight counts
are frozen values taken when the view was made, prefix matching has no side effect), the scheduler *returns*
what it learned as records (:class:`Placed`, :class:`Capacity`), and the director applies them together with
the response-phase records (:class:`Started`, :class:`FirstByte`, :class:`Finished`). The KV-event consumer
applies :class:`EngineEvents`. An implementation ignores records it does not learn from (the KV-event prefix
store ignores :class:`Placed`: the servers say what they hold; the approximate one ignores
:class:`EngineEvents`: it cannot resolve the engines' hashes).

Records and :class:`Inflight` are values: nothing changes one after it is made. They are not ``frozen``
dataclasses only because a frozen dataclass costs about 0.4 µs more to construct, and the picker makes
several per decision. Because they are plain values, an implementation may also ship them elsewhere (another
worker, another replica) before or instead of applying them locally.

The contract both interfaces keep is written down as tests, run over every implementation:
``tests/unit/test_learned_contract.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from inferoute.kvevents.wire import KVEvent


@dataclass(slots=True, unsafe_hash=True)  # hashable: a value, and the default of Candidate.inflight
class Inflight:
    """In-flight load this picker placed on one endpoint, as of one view (a value: it never changes)."""

    requests: int = 0
    """Picked and not finished."""
    pending: int = 0
    """Picked and no response byte yet (queued or prefilling)."""
    pending_tokens: int = 0
    """Prompt tokens the pending requests still have to prefill there (the uncached part)."""
    tokens: int = 0
    """Prompt tokens (estimate) of the unfinished requests."""


IDLE = Inflight()


# -- records ----------------------------------------------------------------------------------------------
@dataclass(slots=True)
class Placed:
    """A request was sent to ``endpoint``: it will hold these prefix blocks (most recently used), each
    standing for ``tokens_per_block`` tokens of its KV cache."""

    endpoint: str
    keys: tuple[int, ...]
    tokens_per_block: int = 1
    known: int = 0
    """Leading ``keys`` the picker already counted as held there when it decided: nothing new about them
    (picker replicas share only the rest)."""


@dataclass(slots=True)
class Capacity:
    """``endpoint`` can hold ``tokens`` tokens of KV cache (autoTune: ``num_gpu_blocks x block_size``); None
    goes back to the configured default. An estimate bounded by capacity evicts its oldest blocks."""

    endpoint: str
    tokens: int | None


@dataclass(slots=True)
class Started:
    """A request of ``prompt_tokens`` went to ``endpoint``, which must prefill ``prefill_tokens`` of them."""

    endpoint: str
    prompt_tokens: int
    prefill_tokens: int


@dataclass(slots=True)
class FirstByte:
    """Its response started (prefill done)."""

    endpoint: str
    prefill_tokens: int


@dataclass(slots=True)
class Finished:
    """It finished or was aborted; ``started`` says whether :class:`FirstByte` was recorded."""

    endpoint: str
    prompt_tokens: int
    prefill_tokens: int
    started: bool


@dataclass(frozen=True, slots=True)
class EngineEvents:
    """One batch of ``endpoint``'s KV-cache events (``model``: its served base model, from the topic)."""

    endpoint: str
    events: tuple[KVEvent, ...]
    model: str = ""


Record = Placed | Capacity | Started | FirstByte | Finished | EngineEvents


# -- interfaces -------------------------------------------------------------------------------------------
class PrefixStore(Protocol):
    """Which endpoint holds which prefix blocks. Keys are chained: a key stands for its whole prefix."""

    def match(self, keys: Sequence[int], endpoints: Iterable[str]) -> dict[str, int]:
        """Leading ``keys`` each of ``endpoints`` holds; endpoints holding none are absent. No side effect."""
        ...

    def apply(self, records: Iterable[Record]) -> None:
        """Learn from records (those this store does not learn from are ignored)."""
        ...

    def forget(self, endpoints: Iterable[str]) -> None:
        """Drop everything known about ``endpoints`` (removed from the pool)."""
        ...

    def size(self) -> int:
        """Distinct keys held by any endpoint."""
        ...

    def held_tokens(self, endpoint: str) -> int:
        """Tokens of KV cache ``endpoint`` holds as far as this store knows (0: nothing known)."""
        ...


class LearnedView(Protocol):
    """What one scheduling cycle reads. Immutable: records applied after it was made do not show."""

    def inflight(self, endpoint: str) -> Inflight: ...

    def match(self, keys: Sequence[int], endpoints: Iterable[str]) -> Mapping[str, int]:
        """The prefix store's :meth:`PrefixStore.match` (read during the cycle that made the view)."""
        ...

    def size(self) -> int:
        """Distinct prefix keys known."""
        ...

    def held_tokens(self, endpoint: str) -> int:
        """The prefix store's :meth:`PrefixStore.held_tokens`."""
        ...


class LearnedState(Protocol):
    """The picker's learned state: in-flight accounting plus a prefix store."""

    def snapshot(self) -> LearnedView: ...

    def apply(self, records: Iterable[Record]) -> None: ...

    def forget_endpoints(self, endpoints: Iterable[str]) -> None: ...


@runtime_checkable
class SharesPlacements(Protocol):
    """A learned state that carries placements between picker replicas (the cross-replica syncer's)."""

    def placement_channel(
        self, name: str, sink: Callable[[Sequence[Placed]], None]
    ) -> Callable[[Placed], None]:
        """Open channel ``name``: returns what publishes one of this replica's placements; the peers' go
        to ``sink``."""
        ...
