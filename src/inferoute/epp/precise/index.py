"""The precise prefix index: which endpoint holds which prompt blocks, from the engines' own KV events. Pure.

Keys are the picker's own, recomputed from each event's ``token_ids`` the way llm-d's indexer does
(``pkg/kvcache/kvblock``), so engine and picker block sizes need not match and engine hashes are only opaque
handles:

* a *request key* names a picker block of ``block_size`` tokens and its whole prefix, exactly as llm-d's
  ``chunkedTokenDatabase`` computes it: ``key = fnv1a_64(cbor([parent_key, [token ids], null]))`` (canonical
  CBOR, the parent as an unsigned integer); the chain starts at ``root(model) =
  fnv1a_64(cbor([fnv1a_64(hash_seed), null, model]))``, where the model is the LoRA adapter's name when the
  blocks belong to one, else the served base model (the topic's model part). So the keys equal the
  reference's for the same tokens, seed and block size (multimodal extras, llm-d's third element, are not
  modelled). The engines' own ``sha256_cbor`` hashes stay opaque handles.
* ``BlockStored`` on endpoint E: the parent engine hash resolves to the chain state after that block (the
  last request key and the tokens of a picker block not yet complete); the event's tokens continue the chain.
  Each engine block *owns* the request keys its tokens complete (none, one or several), and every physical
  copy counts: residency is reference-counted per (request key, endpoint).
* ``BlockRemoved``: one copy of the engine block is gone; the keys it owns lose one reference on E.
* ``AllBlocksCleared`` / publisher restart / endpoint removal: everything of E is dropped.

*Speculative indexing* (llm-d's ``speculativeIndexing``): with a TTL, a
:class:`~inferoute.epp.learned.port.Placed` record (the producer's keys for the endpoint just picked) counts
as held for ``speculative_ttl`` seconds. A server publishes a request's blocks only after prefilling it, so
without this every request of the same prefix arriving in that window sees nothing and may be sent elsewhere,
copying the prefix to a second server. Events stay the truth: a speculative entry never changes residency
counts, and it expires (or is dropped with its endpoint).

An event whose parent the index has never seen (it was evicted, or the subscriber joined late without replay)
cannot be placed in a chain and is skipped (counted in :attr:`PreciseIndex.orphans`).

:meth:`PreciseIndex.match` answers "how many leading blocks of this prompt does each endpoint hold" in one
walk that stops at the first block no remaining endpoint holds.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field

import cbor2
from fnv_c import fnv1a_64

from inferoute.epp.learned.port import EngineEvents, Placed, Record
from inferoute.kvevents.wire import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

U64 = (1 << 64) - 1


def root_key(seed: str, model: str) -> int:
    """llm-d's ``getInitHash``: the parent of a model's first block."""
    init = fnv1a_64(seed.encode())
    return int(fnv1a_64(cbor2.dumps([init, None, model], canonical=True)))


def request_keys(tokens: Sequence[int], block_size: int, parent: int) -> list[int]:
    """Chained keys of the full ``block_size`` blocks of ``tokens`` after ``parent`` (llm-d's
    ``TokensToKVBlockKeys`` without multimodal extras)."""
    out: list[int] = []
    full = len(tokens) - len(tokens) % block_size
    dumps = cbor2.dumps
    for start in range(0, full, block_size):
        parent = int(fnv1a_64(dumps([parent, tokens[start : start + block_size], None], canonical=True)))
        out.append(parent)
    return out


@dataclass(slots=True)
class _EngineBlock:
    copies: int
    owned: list[int]
    """Request keys this engine block completes."""
    last_key: int
    """The chain state after this block: the last complete request key ..."""
    pending: tuple[int, ...]
    """... and the tokens of the picker block it left incomplete."""


@dataclass(slots=True)
class _Endpoint:
    model: str
    blocks: dict[int, _EngineBlock] = field(default_factory=dict)
    block_tokens: int = 0
    """The engine's block size (from its ``BlockStored`` events)."""


class PreciseIndex:
    """Per-endpoint engine blocks and the reverse map request key -> {endpoint: copies}.

    The KV-event implementation of :class:`~inferoute.epp.learned.port.PrefixStore`: it learns from
    :class:`~inferoute.epp.learned.port.EngineEvents` records only (the servers say what they hold; where the
    picker sent a prompt proves nothing), and needs no capacity: the servers evict and say so."""

    def __init__(
        self,
        block_size: int = 16,
        hash_seed: str = "",
        *,
        speculative_ttl: float = 0.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        if speculative_ttl > 0 and clock is None:
            raise ValueError("speculative indexing needs a clock")
        self.speculative_ttl = speculative_ttl
        self._clock = clock
        self._spec: dict[int, dict[str, float]] = {}
        """Speculative entries: key -> {endpoint: expiry}."""
        self._spec_order: deque[tuple[float, str, Sequence[int]]] = deque()
        self.block_size = block_size
        self.hash_seed = hash_seed
        self._holders: dict[int, dict[str, int]] = {}
        self._endpoints: dict[str, _Endpoint] = {}
        self._roots: dict[str, int] = {}
        self.orphans = 0
        """``BlockStored`` events skipped because their parent block was unknown."""
        self.malformed = 0
        """Events whose token count does not match ``len(block_hashes) x block_size``."""

    # -- keys -------------------------------------------------------------------------------------------
    def root(self, model: str) -> int:
        r = self._roots.get(model)
        if r is None:
            r = self._roots[model] = root_key(self.hash_seed, model)
        return r

    def keys_for(self, tokens: Sequence[int], model: str) -> list[int]:
        """The request keys of a prompt for ``model`` (adapter name or base model)."""
        return request_keys(tokens, self.block_size, self.root(model))

    # -- records and events -----------------------------------------------------------------------------
    def apply(self, records: Iterable[Record]) -> None:
        for r in records:
            if isinstance(r, EngineEvents):
                self.apply_events(r.endpoint, r.events, r.model)
            elif isinstance(r, Placed) and self.speculative_ttl > 0:
                self.speculate(r.endpoint, r.keys)

    def speculate(self, endpoint: str, keys: Sequence[int]) -> None:
        """Count ``keys`` as held by ``endpoint`` until the TTL runs out (speculative indexing)."""
        assert self._clock is not None
        now = self._clock()
        self._expire(now)
        if not keys:
            return
        until = now + self.speculative_ttl
        spec = self._spec
        for key in keys:
            held = spec.get(key)
            if held is None:
                spec[key] = {endpoint: until}
            else:
                held[endpoint] = until
        self._spec_order.append((until, endpoint, keys))

    def _expire(self, now: float) -> None:
        order, spec = self._spec_order, self._spec
        while order and order[0][0] <= now:
            _, endpoint, keys = order.popleft()
            for key in keys:
                held = spec.get(key)
                if held is not None and held.get(endpoint, now + 1.0) <= now:
                    del held[endpoint]
                    if not held:
                        del spec[key]

    def forget(self, endpoints: Iterable[str]) -> None:
        for ep in endpoints:
            self.clear(ep)

    def apply_events(self, endpoint: str, events: Iterable[KVEvent], model: str = "") -> None:
        """Apply one batch of ``endpoint``'s events; ``model`` is its served base model."""
        ep = self._endpoints.get(endpoint)
        if ep is None:
            ep = self._endpoints[endpoint] = _Endpoint(model)
        elif model:
            ep.model = model
        for ev in events:
            if isinstance(ev, BlockStored):
                self._stored(endpoint, ep, ev)
            elif isinstance(ev, BlockRemoved):
                for h in ev.block_hashes:
                    self._removed(endpoint, ep, h)
            elif isinstance(ev, AllBlocksCleared):
                self.clear(endpoint)
                ep = self._endpoints[endpoint] = _Endpoint(ep.model)

    def _stored(self, endpoint: str, ep: _Endpoint, ev: BlockStored) -> None:
        ebs = ev.block_size
        if len(ev.token_ids) != ebs * len(ev.block_hashes):
            self.malformed += 1
            return
        ep.block_tokens = ebs
        pending: tuple[int, ...]
        if ev.parent_block_hash is None:
            last, pending = self.root(ev.lora_name or ep.model), ()
        else:
            parent = ep.blocks.get(ev.parent_block_hash)
            if parent is None:
                self.orphans += 1
                return
            last, pending = parent.last_key, parent.pending
        pbs = self.block_size
        holders = self._holders
        tokens = ev.token_ids
        for j, h in enumerate(ev.block_hashes):
            run = pending + tokens[j * ebs : (j + 1) * ebs]
            complete = len(run) - len(run) % pbs
            owned = request_keys(run[:complete], pbs, last) if complete else []
            if owned:
                last = owned[-1]
            pending = run[complete:]
            block = ep.blocks.get(h)
            if block is None:
                block = ep.blocks[h] = _EngineBlock(0, owned, last, pending)
            block.copies += 1
            for key in block.owned:
                held = holders.get(key)
                if held is None:
                    held = holders[key] = {}
                held[endpoint] = held.get(endpoint, 0) + 1

    def _removed(self, endpoint: str, ep: _Endpoint, h: int) -> None:
        block = ep.blocks.get(h)
        if block is None:
            return
        block.copies -= 1
        if block.copies <= 0:
            del ep.blocks[h]
        holders = self._holders
        for key in block.owned:
            held = holders.get(key)
            if held is None:
                continue
            n = held.get(endpoint, 0) - 1
            if n > 0:
                held[endpoint] = n
            else:
                held.pop(endpoint, None)
                if not held:
                    del holders[key]

    def clear(self, endpoint: str) -> None:
        """Forget everything ``endpoint`` holds (reset, publisher restart, endpoint removed)."""
        for key in [k for k, spec in self._spec.items() if endpoint in spec]:
            spec = self._spec[key]
            del spec[endpoint]
            if not spec:
                del self._spec[key]
        ep = self._endpoints.pop(endpoint, None)
        if ep is None:
            return
        holders = self._holders
        for block in ep.blocks.values():
            for key in block.owned:
                held = holders.get(key)
                if held is not None and held.pop(endpoint, None) is not None and not held:
                    del holders[key]

    # -- queries ----------------------------------------------------------------------------------------
    def match(self, keys: Sequence[int], endpoints: Iterable[str]) -> dict[str, int]:
        """Leading request keys each endpoint holds (endpoints with none are absent)."""
        out: dict[str, int] = {}
        alive = list(endpoints)
        holders = self._holders
        now = self._clock() if self._spec and self._clock is not None else 0.0
        for n, key in enumerate(keys):
            held: Collection[str] | None = holders.get(key)
            if self._spec:
                held = self._with_speculative(key, held, now)
            if held is None:
                if n:
                    out.update(dict.fromkeys(alive, n))
                return out
            still = [e for e in alive if e in held]
            if n and len(still) != len(alive):
                out.update((e, n) for e in alive if e not in held)
            if not still:
                return out
            alive = still
        if keys:
            out.update(dict.fromkeys(alive, len(keys)))
        return out

    def _with_speculative(self, key: int, held: Collection[str] | None, now: float) -> Collection[str] | None:
        spec = self._spec.get(key)
        if spec is None:
            return held
        live = {e for e, until in spec.items() if until > now}
        if not live:
            return held
        return live if held is None else live.union(held)

    def residency(self, key: int, endpoint: str) -> int:
        """Copies of request key ``key`` that ``endpoint`` holds."""
        return self._holders.get(key, {}).get(endpoint, 0)

    def size(self) -> int:
        """Distinct request keys held anywhere."""
        return len(self._holders)

    def endpoint_blocks(self, endpoint: str) -> int:
        """Engine blocks known for ``endpoint``."""
        ep = self._endpoints.get(endpoint)
        return len(ep.blocks) if ep is not None else 0

    def held_tokens(self, endpoint: str) -> int:
        """Tokens of the engine blocks ``endpoint`` said it holds (speculative entries not counted)."""
        ep = self._endpoints.get(endpoint)
        return len(ep.blocks) * ep.block_tokens if ep is not None else 0

    def endpoints(self) -> list[str]:
        return list(self._endpoints)
