"""``prefix-cache-scorer``: prefer endpoints that probably hold this prompt's prefix in their KV cache.

Formula (GIE): ``matched_blocks / total_blocks`` where ``matched_blocks`` is the number of leading prefix
blocks the approximate prefix index says the endpoint holds (0 when the prompt is empty).
Input: the request's chained block hashes and the learned prefix index (see
:mod:`inferoute.epp.scheduling.prefix`); the engine returns the hashes for the picked endpoint as a ``Placed``
record afterwards.
Parameters: ``prefixMatchInfoProducerName`` names the producer whose match information is scored (the
reference's wiring: ``precise-prefix-cache-producer`` for KV-event-fed precise matching); absent, the
approximate index is used. Block size, match cap and LRU capacity belong to ``approx-prefix-cache-producer``
(GIE ignores scorer parameters too); for convenience the same keys are accepted on the scorer when no producer
is configured.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

from inferoute.epp.plugin import Params, PluginDeps, config_error
from inferoute.epp.scheduling.types import (
    Candidate,
    CycleContext,
    PickObserver,
    PrefixMatchProducer,
    PrefixSettings,
)

TYPE = "prefix-cache-scorer"
APPROX_PRODUCER = "approx-prefix-cache-producer"
ROLE = "scorer"


class PrefixCacheScorer:
    type_name: ClassVar[str] = TYPE

    def __init__(
        self, name: str, settings: PrefixSettings | None = None, producer_name: str | None = None
    ) -> None:
        self.name = name
        self.settings = settings
        """Prefix parameters given on the scorer itself (applied by the config loader), if any."""
        self.producer_name = producer_name
        self.producer: PrefixMatchProducer | None = None
        self._observer: PickObserver | None = None
        """The producer when it learns from picks (checked once: a runtime protocol check costs ~10 µs)."""

    def bind(self, plugins: Mapping[str, object]) -> None:
        """Resolve ``prefixMatchInfoProducerName`` once every plugin exists."""
        name = self.producer_name
        if name is None:
            return
        producer = plugins.get(name)
        if getattr(producer, "type_name", "") == APPROX_PRODUCER:
            return  # the built-in approximate index
        if not isinstance(producer, PrefixMatchProducer):
            valid = [n for n, p in plugins.items() if isinstance(p, PrefixMatchProducer)]
            raise config_error(
                f"{self.name}.parameters.prefixMatchInfoProducerName: {name!r} is not a prefix-match "
                f"producer; defined: {', '.join(valid) or '(none)'}"
            )
        self.producer = producer
        self._observer = producer if isinstance(producer, PickObserver) else None

    def on_picked(self, ctx: CycleContext, picked: Candidate, candidates: Sequence[Candidate]) -> None:
        """The producer learns from the pick when it does (speculative indexing); the producer is not part of
        the profile, so the scorer tells it."""
        if self._observer is not None:
            self._observer.on_picked(ctx, picked, candidates)

    def score(self, ctx: CycleContext, candidates: Sequence[Candidate]) -> list[float]:
        if self.producer is not None:
            matched, total = self.producer.prefix_match(ctx, candidates)
            if not total:
                return [0.0] * len(candidates)
            return [matched.get(c.key, 0) / total for c in candidates]
        hashes = ctx.prefix_hashes(candidates)
        if not hashes:
            return [0.0] * len(candidates)
        match = ctx.prefix_match(candidates)
        total = len(hashes)
        return [match.get(c.key, 0) / total for c in candidates]


def read_prefix_settings(params: Params) -> PrefixSettings | None:
    """The producer's parameters (shared with ``approx-prefix-cache-producer``); None when none are given."""
    given = bool(set(params.raw) - {"prefixMatchInfoProducerName"})
    auto = params.flag("autoTune", True)
    block = params.integer("blockSizeTokens", 16, minimum=1, maximum=4096)
    legacy_chars = params.integer("blockSize", 0, minimum=0)  # GIE's older character-based block size
    if legacy_chars:
        block = max(1, legacy_chars // 4)
    max_blocks = params.integer("maxPrefixBlocksToMatch", 256, minimum=1, maximum=1 << 20)
    max_tokens = params.integer("maxPrefixTokensToMatch", 0, minimum=0)
    if max_tokens:
        max_blocks = max(1, max_tokens // block)
    lru = params.integer("lruCapacityPerServer", 0, minimum=0)
    settings = PrefixSettings(
        block_size_tokens=block, max_blocks=max_blocks, auto_tune=auto, lru_capacity=lru or None
    )
    return settings if given else None


def create(name: str, params: Params, deps: PluginDeps) -> PrefixCacheScorer:
    producer = params.text("prefixMatchInfoProducerName", "") or None
    return PrefixCacheScorer(name, read_prefix_settings(params), producer)
