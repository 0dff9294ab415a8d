"""The learned-state port's contract, run over every implementation (:mod:`inferoute.epp.learned.port`).

Two interfaces, two parametrized suites:

* :class:`~inferoute.epp.learned.port.PrefixStore` — over :data:`STORES`: the approximate store (learns from
  ``Placed`` records, bounded by ``Capacity``) and the KV-event store (learns from ``EngineEvents``: stores,
  evictions, clears). Tests marked for one kind of store (``event_fed``, ``bounded``) run over the stores of
  that kind.
* :class:`~inferoute.epp.learned.port.LearnedState` — over :data:`STATES`: the in-process state with each
  store.

A new implementation (shared across workers or replicas, say) joins by adding a harness to these lists: the
harness says how to make one and which records make an endpoint hold, lose or clear blocks; every test then
runs over it unchanged.
"""

from __future__ import annotations

import ast
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from inferoute.clock import FakeClock
from inferoute.epp.learned import (
    IDLE,
    Capacity,
    EngineEvents,
    Finished,
    FirstByte,
    Inflight,
    LearnedState,
    LocalLearnedState,
    Placed,
    PrefixIndex,
    PrefixStore,
    Record,
    Started,
)
from inferoute.epp.precise.index import PreciseIndex
from inferoute.epp.sync.inflight import SyncedLearnedState
from inferoute.epp.sync.syncer import MemoryHub, MemorySyncer
from inferoute.kvevents.wire import AllBlocksCleared, BlockRemoved, BlockStored

SRC = Path(__file__).resolve().parents[2] / "src" / "inferoute"


# -- harnesses --------------------------------------------------------------------------------------------
@dataclass
class StoreHarness:
    """How the suite drives one PrefixStore implementation. A *prompt* is a variant number; its blocks are
    the store's chained keys of that prompt."""

    name: str
    make: Callable[[], PrefixStore]
    keys: Callable[[int, int], list[int]]
    """(blocks, prompt) -> the chain keys of the prompt's first ``blocks`` blocks."""
    hold: Callable[[str, int, int], list[Record]]
    """(endpoint, blocks, prompt) -> records after which ``endpoint`` holds those blocks."""
    evict: Callable[[str, int, int], list[Record]] | None = None
    """(endpoint, block index, prompt) -> records after which it lost that one block (event-fed stores)."""
    clear: Callable[[str], list[Record]] | None = None
    """endpoint -> records after which it holds nothing (event-fed stores)."""
    bounded: bool = False
    """Keeps an estimate bounded by ``Capacity`` records (1 token per block as ``hold`` places them)."""
    marks: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return self.name


def _approx() -> StoreHarness:
    def keys(n: int, prompt: int) -> list[int]:
        return [(prompt + 1) * 1_000_003 + i for i in range(n)]

    return StoreHarness(
        "approx",
        lambda: PrefixIndex(default_capacity=10_000),
        keys,
        lambda ep, n, prompt: [Placed(ep, tuple(keys(n, prompt)), 1)],
        bounded=True,
    )


BS = 4  # picker block size of the KV-event store; the engine's blocks are 8 tokens (two picker blocks)
EBS = 8


def _kvevents(speculative: bool = False) -> StoreHarness:
    def tokens(prompt: int) -> list[int]:
        return [prompt * 10_000 + t for t in range(64 * EBS)]

    def engine_hash(prompt: int, i: int) -> int:
        return (prompt + 1) * 100_000 + i

    def keys(n: int, prompt: int) -> list[int]:
        return PreciseIndex(BS).keys_for(tokens(prompt)[: n * BS], "m")

    def hold(ep: str, n: int, prompt: int) -> list[Record]:
        blocks = -(-n // 2)  # engine blocks covering n picker blocks; an odd n holds one picker block more
        ev = BlockStored(
            tuple(engine_hash(prompt, i) for i in range(blocks)),
            None,
            tuple(tokens(prompt)[: blocks * EBS]),
            EBS,
        )
        return [EngineEvents(ep, (ev,), "m")]

    def evict(ep: str, i: int, prompt: int) -> list[Record]:
        # picker block i lives in engine block i // 2, which also owns its sibling picker block
        return [EngineEvents(ep, (BlockRemoved((engine_hash(prompt, i // 2),)),), "m")]

    def make() -> PrefixStore:
        if speculative:  # placements count for a while too; the contract holds for what events say
            return PreciseIndex(BS, speculative_ttl=2.0, clock=FakeClock(5.0).now)
        return PreciseIndex(BS)

    return StoreHarness(
        "kvevents+speculative" if speculative else "kvevents",
        make,
        keys,
        hold,
        evict=evict,
        clear=lambda ep: [EngineEvents(ep, (AllBlocksCleared(),), "m")],
    )


STORES: list[StoreHarness] = [_approx(), _kvevents(), _kvevents(speculative=True)]
"""Every PrefixStore implementation (add yours here)."""
EVENT_FED = [h for h in STORES if h.evict is not None]
BOUNDED = [h for h in STORES if h.bounded]


def _synced(prefix: PrefixStore | None) -> LearnedState:
    hub = MemoryHub(lambda: 0.0)
    MemorySyncer(hub, "idle-peer")
    return SyncedLearnedState(MemorySyncer(hub, "me"), prefix)


@dataclass
class StateHarness:
    name: str
    make: Callable[[], LearnedState]
    store: StoreHarness
    """How its prefix part is driven."""

    def __str__(self) -> str:
        return self.name


STATES: list[StateHarness] = [
    StateHarness("local+approx", lambda: LocalLearnedState(), STORES[0]),
    StateHarness("local+kvevents", lambda: LocalLearnedState(PreciseIndex(BS)), STORES[1]),
    # shared in-flight load (inferoute.epp.sync), here with a peer that has nothing in flight
    StateHarness("synced+approx", lambda: _synced(None), STORES[0]),
    StateHarness("synced+kvevents", lambda: _synced(PreciseIndex(BS)), STORES[1]),
]
"""Every LearnedState implementation (add yours here)."""


def _ids(items: Sequence[object]) -> list[str]:
    return [str(i) for i in items]


# -- PrefixStore ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("h", STORES, ids=_ids(STORES))
def test_an_empty_store_matches_nothing(h: StoreHarness) -> None:
    store = h.make()
    assert store.match(h.keys(4, 0), ["a", "b"]) == {}
    assert store.match([], ["a"]) == {}
    assert store.size() == 0


@pytest.mark.parametrize("h", STORES, ids=_ids(STORES))
def test_match_counts_the_leading_blocks_each_endpoint_holds(h: StoreHarness) -> None:
    store = h.make()
    store.apply([*h.hold("a", 2, 0), *h.hold("b", 6, 0), *h.hold("c", 4, 1)])
    keys = h.keys(6, 0)
    assert store.match(keys, ["a", "b", "c"]) == {"a": 2, "b": 6}
    assert store.match(keys[:4], ["a", "b"]) == {"a": 2, "b": 4}
    assert store.match(h.keys(4, 1), ["a", "b", "c"]) == {"c": 4}


@pytest.mark.parametrize("h", STORES, ids=_ids(STORES))
def test_only_the_asked_endpoints_are_answered(h: StoreHarness) -> None:
    store = h.make()
    store.apply([*h.hold("a", 4, 0), *h.hold("b", 4, 0)])
    keys = h.keys(4, 0)
    assert store.match(keys, ["b"]) == {"b": 4}
    assert store.match(keys, ["nobody"]) == {}
    assert store.match(keys, []) == {}


@pytest.mark.parametrize("h", STORES, ids=_ids(STORES))
def test_matching_stops_at_the_first_block_not_held(h: StoreHarness) -> None:
    store = h.make()
    store.apply(h.hold("a", 4, 0))
    keys = h.keys(4, 0)
    other = h.keys(4, 1)
    assert store.match([keys[0], other[1], keys[2], keys[3]], ["a"]) == {"a": 1}
    assert store.match([other[0], *keys[1:]], ["a"]) == {}  # later blocks without the first: no prefix


@pytest.mark.parametrize("h", STORES, ids=_ids(STORES))
def test_size_counts_distinct_keys_and_match_changes_nothing(h: StoreHarness) -> None:
    store = h.make()
    store.apply([*h.hold("a", 2, 0), *h.hold("b", 6, 0)])
    assert store.size() == 6
    for _ in range(3):
        assert store.match(h.keys(6, 0), ["a", "b"]) == {"a": 2, "b": 6}
    assert store.size() == 6


@pytest.mark.parametrize("h", STORES, ids=_ids(STORES))
def test_records_it_does_not_learn_from_change_nothing(h: StoreHarness) -> None:
    store = h.make()
    store.apply(h.hold("a", 4, 0))
    store.apply([Started("a", 100, 50), FirstByte("a", 50), Finished("a", 100, 50, started=True)])
    store.apply([Started("b", 100, 100)])
    assert store.match(h.keys(4, 0), ["a", "b"]) == {"a": 4}
    assert store.size() == 4


@pytest.mark.parametrize("h", STORES, ids=_ids(STORES))
def test_forget_drops_the_endpoint_and_keeps_the_others(h: StoreHarness) -> None:
    store = h.make()
    store.apply([*h.hold("a", 6, 0), *h.hold("b", 2, 0)])
    store.forget(["a", "never-seen"])
    assert store.match(h.keys(6, 0), ["a", "b"]) == {"b": 2}
    assert store.size() == 2
    store.apply(h.hold("a", 2, 1))  # a returning endpoint starts from nothing
    assert store.match(h.keys(6, 0), ["a", "b"]) == {"b": 2}


@pytest.mark.parametrize("h", STORES, ids=_ids(STORES))
def test_held_tokens_grow_with_what_an_endpoint_holds(h: StoreHarness) -> None:
    store = h.make()
    store.apply([*h.hold("a", 6, 0), *h.hold("b", 2, 1)])
    held_a, held_b = store.held_tokens("a"), store.held_tokens("b")
    assert held_a > held_b > 0
    assert store.held_tokens("nobody") == 0
    store.forget(["a"])
    assert store.held_tokens("a") == 0 and store.held_tokens("b") == held_b


@pytest.mark.parametrize("h", STORES, ids=_ids(STORES))
@pytest.mark.parametrize("seed", range(5))
def test_random_placements_agree_with_a_model(h: StoreHarness, seed: int) -> None:
    """Whatever endpoints hold, ``match`` answers the longest held prefix of each (a plain model: for each
    (endpoint, prompt) the most blocks ever held; no eviction happens within the sizes used)."""
    rng = random.Random(seed)
    store = h.make()
    held: dict[tuple[str, int], int] = {}
    endpoints = ["a", "b", "c", "d"]
    for _ in range(30):
        ep, prompt, n = rng.choice(endpoints), rng.randrange(3), rng.randrange(1, 9)
        store.apply(h.hold(ep, n, prompt))
        held[ep, prompt] = max(held.get((ep, prompt), 0), n + (n % 2 if h.evict is not None else 0))
        prompt = rng.randrange(3)
        asked = rng.sample(endpoints, rng.randrange(1, 5))
        length = rng.randrange(0, 9)
        want = {e: min(held.get((e, prompt), 0), length) for e in asked}
        assert store.match(h.keys(length, prompt), asked) == {e: n for e, n in want.items() if n}


@pytest.mark.parametrize("h", EVENT_FED, ids=_ids(EVENT_FED))
def test_an_evicted_block_cuts_the_prefix_there(h: StoreHarness) -> None:
    assert h.evict is not None
    store = h.make()
    store.apply([*h.hold("a", 8, 0), *h.hold("b", 8, 0)])
    store.apply(h.evict("a", 4, 0))
    assert store.match(h.keys(8, 0), ["a", "b"]) == {"a": 4, "b": 8}


@pytest.mark.parametrize("h", EVENT_FED, ids=_ids(EVENT_FED))
def test_every_copy_counts_until_its_own_eviction(h: StoreHarness) -> None:
    assert h.evict is not None
    store = h.make()
    store.apply([*h.hold("a", 4, 0), *h.hold("a", 4, 0)])  # two physical copies
    store.apply(h.evict("a", 0, 0))
    assert store.match(h.keys(4, 0), ["a"]) == {"a": 4}
    store.apply(h.evict("a", 0, 0))
    assert store.match(h.keys(4, 0), ["a"]) == {}


@pytest.mark.parametrize("h", EVENT_FED, ids=_ids(EVENT_FED))
def test_a_clear_drops_one_endpoint(h: StoreHarness) -> None:
    assert h.clear is not None
    store = h.make()
    store.apply([*h.hold("a", 4, 0), *h.hold("b", 2, 0)])
    store.apply(h.clear("a"))
    assert store.match(h.keys(4, 0), ["a", "b"]) == {"b": 2}


@pytest.mark.parametrize("h", BOUNDED, ids=_ids(BOUNDED))
def test_capacity_keeps_the_most_recent_blocks(h: StoreHarness) -> None:
    store = h.make()
    store.apply([Capacity("a", 6), *h.hold("a", 4, 0), *h.hold("a", 4, 1)])
    assert store.match(h.keys(4, 1), ["a"]) == {"a": 4}
    assert store.match(h.keys(4, 0), ["a"]) == {}  # its oldest blocks went first
    store.apply([*h.hold("a", 4, 0), Capacity("a", None)])  # back to the default: nothing more is lost
    assert store.match(h.keys(4, 0), ["a"]) == {"a": 4}
    store.apply([Capacity("b", 2), *h.hold("b", 4, 0)])  # per endpoint
    assert store.match(h.keys(4, 0), ["a", "b"]) == {"a": 4}


# -- LearnedState -----------------------------------------------------------------------------------------
def _counts(c: Inflight) -> tuple[int, int, int, int]:
    return (c.requests, c.pending, c.pending_tokens, c.tokens)


@pytest.mark.parametrize("h", STATES, ids=_ids(STATES))
def test_a_view_never_changes(h: StateHarness) -> None:
    state = h.make()
    before = state.snapshot()
    state.apply([Started("a", 100, 40)])
    after = state.snapshot()
    state.apply([Started("a", 10, 10), FirstByte("a", 40)])
    assert before.inflight("a") == IDLE
    assert _counts(after.inflight("a")) == (1, 1, 40, 100)
    assert _counts(state.snapshot().inflight("a")) == (2, 1, 10, 110)


@pytest.mark.parametrize("h", STATES, ids=_ids(STATES))
def test_inflight_follows_a_request_through_its_records(h: StateHarness) -> None:
    state = h.make()
    state.apply([Started("a", 100, 60), Started("a", 50, 50)])
    assert _counts(state.snapshot().inflight("a")) == (2, 2, 110, 150)
    state.apply([FirstByte("a", 60)])
    assert _counts(state.snapshot().inflight("a")) == (2, 1, 50, 150)
    state.apply([Finished("a", 100, 60, started=True)])
    assert _counts(state.snapshot().inflight("a")) == (1, 1, 50, 50)
    state.apply([Finished("a", 50, 50, started=False)])  # aborted before its first byte
    assert state.snapshot().inflight("a") == IDLE
    assert state.snapshot().inflight("b") == IDLE


@pytest.mark.parametrize("h", STATES, ids=_ids(STATES))
def test_counts_never_go_negative(h: StateHarness) -> None:
    state = h.make()
    state.apply([FirstByte("x", 10), Finished("x", 10, 10, started=True)])  # nothing was started there
    assert state.snapshot().inflight("x") == IDLE
    state.apply([Started("x", 10, 5), FirstByte("x", 50), FirstByte("x", 50)])
    assert _counts(state.snapshot().inflight("x")) == (1, 0, 0, 10)
    state.apply([Finished("x", 99, 99, started=False), Finished("x", 1, 1, started=True)])
    assert state.snapshot().inflight("x") == IDLE


@pytest.mark.parametrize("h", STATES, ids=_ids(STATES))
def test_prefix_records_reach_the_views_matching(h: StateHarness) -> None:
    state = h.make()
    s = h.store
    state.apply([Started("a", 10, 10), *s.hold("a", 4, 0), *s.hold("b", 2, 0)])
    view = state.snapshot()
    assert view.match(s.keys(4, 0), ["a", "b", "c"]) == {"a": 4, "b": 2}
    assert view.size() == 4
    assert view.held_tokens("a") > view.held_tokens("b") > 0 == view.held_tokens("c")


@pytest.mark.parametrize("h", STATES, ids=_ids(STATES))
def test_forgotten_endpoints_lose_load_and_prefixes(h: StateHarness) -> None:
    state = h.make()
    s = h.store
    state.apply([Started("a", 10, 10), Started("b", 20, 20), *s.hold("a", 4, 0), *s.hold("b", 2, 0)])
    kept = state.snapshot()
    state.forget_endpoints(["a"])
    view = state.snapshot()
    assert view.inflight("a") == IDLE and _counts(view.inflight("b")) == (1, 1, 20, 20)
    assert view.match(s.keys(4, 0), ["a", "b"]) == {"b": 2}
    assert _counts(kept.inflight("a")) == (1, 1, 10, 10)  # an older view still reads its own counts


# -- dependency direction ---------------------------------------------------------------------------------
def test_learned_state_imports_nothing_of_scheduling() -> None:
    """Scheduling depends on the port, never the other way round: no import of scheduling anywhere in the
    learned package or the KV-event store, not even a lazy or type-checking-only one."""
    files = [*sorted((SRC / "epp" / "learned").glob("*.py")), SRC / "epp" / "precise" / "index.py"]
    found = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            found += [f"{path.name}: {n}" for n in names if n.startswith("inferoute.epp.scheduling")]
    assert len(files) >= 5 and not found, found
