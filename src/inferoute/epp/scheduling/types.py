"""The scheduling vocabulary: the request, candidate endpoints, the per-cycle context and the plugin roles.

One Protocol per role: :class:`Filter`, :class:`Scorer`, :class:`PickerPlugin`, plus the optional
:class:`PickObserver` for plugins that learn from each decision (prefix index, session affinity, round robin).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, runtime_checkable

from inferoute.epp.datalayer.metrics import EndpointMetrics
from inferoute.epp.learned.port import IDLE, Inflight, LearnedView
from inferoute.epp.scheduling.prefix import (
    DEFAULT_BLOCK_SIZE_TOKENS,
    DEFAULT_MAX_PREFIX_BLOCKS,
    PrefixHashCache,
    prefix_hashes,
)


@dataclass(slots=True)
class InferenceRequest:
    """A parsed request, as scheduling sees it."""

    model: str
    """Client-facing model name (from the body)."""
    target_model: str
    """Model (or LoRA adapter) the server will run: ``model`` after rewrites."""
    prompt: bytes | memoryview = b""
    """The raw prompt bytes used for prefix matching (completions ``prompt`` or chat ``messages`` JSON), often
    a view into the request body."""
    prompt_tokens: int = 0
    """Prompt length estimate in tokens (bytes / 4)."""
    headers: Mapping[str, str] = field(default_factory=dict)
    request_id: str = ""
    objective: str | None = None
    fairness_id: str = "default-flow"
    priority: int = 0
    stream: bool = False
    token_ids: Sequence[int] | None = None
    """The prompt's token ids when a request preparer (``token-producer``) computed them, else None."""
    slo_ttft: float | None = None
    """Time-to-first-token objective in seconds (``x-llm-d-slo-ttft-ms``), None when not given."""
    slo_tpot: float | None = None
    """Time-per-output-token objective in seconds (``x-llm-d-slo-tpot-ms``)."""


@dataclass(slots=True)
class Candidate:
    """An endpoint eligible for this request, with what we know about it."""

    key: str
    """``ip:port``."""
    name: str
    metrics: EndpointMetrics
    inflight: Inflight = IDLE
    """This picker's in-flight load on it, as of the cycle's :class:`~inferoute.epp.learned.port.LearnedView`
    (a frozen value; the director sets it when it hands out the candidate)."""
    labels: Mapping[str, str] = field(default_factory=dict)


MIN_AUTO_BLOCK_TOKENS = 64
"""Smallest prefix block size autoTune derives from a server's ``cache_config_info``."""


@dataclass(slots=True)
class PrefixSettings:
    """How requests are cut into prefix blocks (the approx-prefix-cache producer's parameters)."""

    block_size_tokens: int = DEFAULT_BLOCK_SIZE_TOKENS
    max_blocks: int = DEFAULT_MAX_PREFIX_BLOCKS
    auto_tune: bool = True
    """Take the block size from the servers' ``cache_config_info`` and the LRU size from
    ``num_gpu_blocks``."""
    lru_capacity: int | None = None
    """Blocks remembered per endpoint when not auto-tuned (None: the index default, 31,250)."""


class CycleContext:
    """Everything one scheduling cycle may read; computed lazily and memoised for all plugins.

    ``learned`` is an immutable view: plugins read it, and the scheduler returns what the cycle learned as
    records (:attr:`~inferoute.epp.scheduling.framework.ProfileResult.records`) for the director to apply."""

    __slots__ = (
        "_block",
        "_hashes",
        "_match",
        "hash_cache",
        "learned",
        "now",
        "prefix_settings",
        "request",
        "rng",
    )

    def __init__(
        self,
        request: InferenceRequest,
        learned: LearnedView,
        *,
        now: float,
        rng: random.Random,
        prefix_settings: PrefixSettings | None = None,
        hash_cache: PrefixHashCache | None = None,
    ) -> None:
        self.request = request
        self.learned = learned
        self.now = now
        self.rng = rng
        self.prefix_settings = prefix_settings or PrefixSettings()
        self.hash_cache = hash_cache
        """Chains of recent long prompts (the director's); None: hash every time."""
        self._hashes: list[int] | None = None
        self._match: Mapping[str, int] | None = None
        self._block: int | None = None

    def block_size_tokens(self, candidates: Sequence[Candidate]) -> int:
        """The prefix block size: the servers' own (autoTune, most common among candidates) or configured."""
        if self._block is not None:
            return self._block
        s = self.prefix_settings
        block = s.block_size_tokens
        if s.auto_tune:
            # the servers' KV block size, but at least MIN_AUTO_BLOCK_TOKENS (as llm-d): 16-token blocks would
            # mean four times the index entries and hashing for the same prompt. The same floor holds before
            # the first scrape (and for servers that never report one), so the placements a picker makes
            # in its first moments are keyed as all its later ones
            block = max(MIN_AUTO_BLOCK_TOKENS, block)
            counts: dict[int, int] = {}
            for c in candidates[:16]:  # a sample is enough: pools run one engine configuration
                b = c.metrics.block_size
                if b:
                    counts[b] = counts.get(b, 0) + 1
            if counts:
                block = max(MIN_AUTO_BLOCK_TOKENS, max(counts, key=lambda b: counts[b]))
        self._block = block
        return block

    def prefix_hashes(self, candidates: Sequence[Candidate]) -> list[int]:
        if self._hashes is None:
            hash_chain = prefix_hashes if self.hash_cache is None else self.hash_cache.hashes
            self._hashes = hash_chain(
                self.request.target_model,
                self.request.prompt,
                block_size_tokens=self.block_size_tokens(candidates),
                max_blocks=self.prefix_settings.max_blocks,
            )
        return self._hashes

    def prefix_match(self, candidates: Sequence[Candidate]) -> Mapping[str, int]:
        """Matched leading blocks per candidate key (absent = 0)."""
        if self._match is None:
            self._match = self.learned.match(self.prefix_hashes(candidates), [c.key for c in candidates])
        return self._match

    def matched_blocks(self, endpoint: str) -> int:
        """Leading prefix blocks ``endpoint`` holds (0 when no plugin computed the prefix hashes)."""
        if self._hashes is None:
            return 0
        match = self._match if self._match is not None else self.learned.match(self._hashes, [endpoint])
        return match.get(endpoint, 0)

    @property
    def hashes_computed(self) -> list[int] | None:
        return self._hashes


class Plugin(Protocol):
    type_name: ClassVar[str]
    name: str


@runtime_checkable
class Filter(Protocol):
    type_name: ClassVar[str]
    name: str

    def filter(self, ctx: CycleContext, candidates: list[Candidate]) -> list[Candidate]:
        """The subset of ``candidates`` that may serve the request (keep the order)."""
        ...


@runtime_checkable
class Scorer(Protocol):
    type_name: ClassVar[str]
    name: str

    def score(self, ctx: CycleContext, candidates: Sequence[Candidate]) -> Sequence[float]:
        """One score per candidate, same order; the engine clamps to [0, 1] and applies the weight."""
        ...


@runtime_checkable
class PickerPlugin(Protocol):
    type_name: ClassVar[str]
    name: str

    def pick(
        self, ctx: CycleContext, candidates: Sequence[Candidate], scores: Sequence[float]
    ) -> list[Candidate]:
        """The chosen endpoint first, then ordered fallbacks (``maxNumOfEndpoints`` in total at most).

        ``scores[i]`` is the weighted total of ``candidates[i]``."""
        ...


@runtime_checkable
class PrefixMatchProducer(Protocol):
    """A source of prefix-match information other than the approximate index (``prefixMatchInfoProducerName``
    of ``prefix-cache-scorer``), e.g. the precise, KV-event-fed one."""

    name: str

    def prefix_match(
        self, ctx: CycleContext, candidates: Sequence[Candidate]
    ) -> tuple[Mapping[str, int], int]:
        """(matched leading blocks per candidate key, total blocks of the prompt)."""
        ...


@runtime_checkable
class PickObserver(Protocol):
    """Optional: learn from the decision (called once per successful cycle with the primary endpoint)."""

    def on_picked(self, ctx: CycleContext, picked: Candidate, candidates: Sequence[Candidate]) -> None: ...


def uncached_tokens(ctx: CycleContext, endpoint: str) -> int:
    """Prompt tokens ``endpoint`` probably has to prefill: the prompt scaled by the fraction of its hashed
    prefix blocks the endpoint does not hold (the whole prompt when no plugin computed prefix hashes). The
    fraction extrapolates past the hashed region (``maxPrefixBlocksToMatch``) for long prompts."""
    tokens = ctx.request.prompt_tokens
    hashes = ctx.hashes_computed
    if not hashes:
        return tokens
    return round(tokens * (1.0 - ctx.matched_blocks(endpoint) / len(hashes)))
