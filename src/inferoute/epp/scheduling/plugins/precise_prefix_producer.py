"""``precise-prefix-cache-producer``: prefix-match information from the model servers' KV-cache events.

It owns a :class:`~inferoute.epp.precise.index.PreciseIndex` fed by one ZMQ subscriber per endpoint
(:mod:`inferoute.epp.precise.subscriber`) and answers ``prefix-cache-scorer`` (wired with
``prefixMatchInfoProducerName``): for each candidate, the leading blocks of the prompt it holds out of the
prompt's full blocks. The prompt's token ids come from ``token-producer`` when configured, else from the local
tokenizer (the simulator's, or a Hugging Face ``tokenizer.json``).

Parameters, by llm-d's names:

* ``tokenProcessorConfig``: ``blockSize`` (16; the picker's block, independent of the engine's),
  ``hashSeed`` ("").
* ``kvEventsConfig``: ``topicFilter`` ("kv@"), ``engineType`` (vllm), ``concurrency`` and ``discoverPods``
  (accepted), ``podDiscoveryConfig`` {``socketPort`` (5557), ``replaySocketPort`` (none),
  ``podLabelSelector``, ``podNamespace`` (accepted: endpoints come from the picker's own source)}. An
  endpoint's ``kv-events-endpoint`` / ``kv-events-replay-endpoint`` labels win over the ports.
* ``indexerConfig``: accepted (the index is in memory).
* ``speculativeIndexing`` (false) and ``speculativeTTL`` (2s): when on, the prompt's keys count as held by the
  picked endpoint for the TTL, until its own events say so (a server publishes blocks only after prefilling
  them; without this, requests of the same prefix arriving meanwhile see nothing). Dark-launched (shadow)
  decisions speculate nothing.
* inferoute's own: ``localTokenizer`` (``simulator`` | ``huggingface``), ``tokenizerFile``,
  ``chatTemplateFile``, ``bosToken``, ``eosToken``, ``replayTimeoutSeconds`` (10).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import ClassVar

from inferoute.endpoints import Endpoint
from inferoute.epp.flowcontrol.units import duration
from inferoute.epp.learned.port import Placed, SharesPlacements
from inferoute.epp.plugin import Params, PluginDeps, config_error
from inferoute.epp.precise.index import PreciseIndex, request_keys
from inferoute.epp.precise.prefixcache import TokenPrefixCache
from inferoute.epp.precise.subscriber import KVEventPool, SubscriberSettings
from inferoute.epp.precise.tokenize import HFTokenizer, LocalTokenizer, SimTokenizer, parse_prompt_value
from inferoute.epp.scheduling.types import Candidate, CycleContext

TYPE = "precise-prefix-cache-producer"
ROLE = "other"


class PrecisePrefixProducer:
    type_name: ClassVar[str] = TYPE

    def __init__(
        self, name: str, index: PreciseIndex, settings: SubscriberSettings, tokenizer: LocalTokenizer
    ) -> None:
        self.name = name
        self.index = index
        self.pool = KVEventPool(index, settings)
        self.tokenizer = tokenizer
        self.token_cache = TokenPrefixCache(index.block_size)
        """Tokens and keys of recent prompts by their text (local tokenization only)."""
        self._cycle: tuple[CycleContext, object, list[int]] | None = None
        """(cycle, its request's token ids, the keys) of the cycle being scored (for :meth:`on_picked`)."""
        self._matched: tuple[CycleContext, Mapping[str, int]] | None = None
        """The cycle's match (what the index held for each candidate when it was scored)."""
        self.share: Callable[[Placed], None] | None = None
        """With picker replicas syncing: publishes a speculative entry to the peers (whose entries come in
        through the same channel)."""

    # -- background ---------------------------------------------------------------------------------------
    async def start(self, endpoints: Sequence[Endpoint]) -> None:
        self.pool.sync(endpoints)

    def endpoints_changed(self, endpoints: Sequence[Endpoint]) -> None:
        self.pool.sync(endpoints)

    async def aclose(self) -> None:
        await self.pool.aclose()

    # -- per cycle ----------------------------------------------------------------------------------------
    def tokens(self, ctx: CycleContext) -> Sequence[int]:
        """The prompt's token ids (from ``token-producer``, else tokenized here)."""
        req = ctx.request
        if req.token_ids is not None:
            return req.token_ids
        prompt = parse_prompt_value(req.prompt, req.target_model)
        if prompt is None:
            return ()
        try:
            return self.tokenizer.encode(prompt)
        except ValueError:
            return ()

    def keys(self, ctx: CycleContext) -> list[int]:
        """The prompt's block keys; a local tokenization goes through the token prefix cache."""
        req = ctx.request
        model = req.target_model
        if req.token_ids is not None:
            return self.index.keys_for(req.token_ids, model)
        prompt = parse_prompt_value(req.prompt, model)
        if prompt is None:
            return []
        if prompt.token_ids is not None:
            return self.index.keys_for(prompt.token_ids, model)
        try:
            text, special = self.tokenizer.text(prompt)
        except ValueError:
            return []
        index = self.index

        def keys(tokens: Sequence[int], parent: int | None) -> list[int]:
            return request_keys(tokens, index.block_size, index.root(model) if parent is None else parent)

        return self.token_cache.tokenize(text, special, model, self.tokenizer.encode_text, keys).keys

    def prefix_match(
        self, ctx: CycleContext, candidates: Sequence[Candidate]
    ) -> tuple[Mapping[str, int], int]:
        cycle = self._cycle
        if cycle is not None and cycle[0] is ctx and cycle[1] is ctx.request.token_ids:
            keys = cycle[2]
        else:
            keys = self.keys(ctx)
            self._cycle = (ctx, ctx.request.token_ids, keys)
        if not keys:
            return {}, 0
        matched = self.index.match(keys, [c.key for c in candidates])
        if self.share is not None:  # on_picked shares only what the peers cannot know yet
            self._matched = (ctx, matched)
        return matched, len(keys)

    def on_picked(self, ctx: CycleContext, picked: Candidate, candidates: Sequence[Candidate]) -> None:
        """Speculative indexing: the picked endpoint will hold the prompt's blocks."""
        cycle, self._cycle = self._cycle, None
        if cycle is not None and cycle[0] is ctx and cycle[2] and self.index.speculative_ttl > 0:
            matched, self._matched = self._matched, None
            known = matched[1].get(picked.key, 0) if matched is not None and matched[0] is ctx else 0
            placed = Placed(picked.key, tuple(cycle[2]), known=known)
            self.index.apply((placed,))
            if self.share is not None:  # the channel sends the peers only the keys past ``known``
                self.share(placed)


def _local_tokenizer(p: Params) -> LocalTokenizer:
    kind = p.text("localTokenizer", "simulator", choices=("simulator", "huggingface"))
    file = p.text("tokenizerFile", "")
    template_file = p.text("chatTemplateFile", "")
    bos, eos = p.text("bosToken", ""), p.text("eosToken", "")
    if kind == "simulator":
        return SimTokenizer()
    if not file:
        raise config_error(f"{p.where}.tokenizerFile: required with localTokenizer: huggingface")
    try:
        template = Path(template_file).read_text() if template_file else None
        return HFTokenizer(file, template, bos, eos)
    except Exception as exc:  # the tokenizers library raises its own exception types
        raise config_error(f"{p.where}.tokenizerFile: cannot load {file!r}: {exc}") from exc


def _subscriber_settings(p: Params) -> SubscriberSettings:
    kv = p.section("kvEventsConfig")
    topic_filter = kv.text("topicFilter", "kv@")
    kv.text("engineType", "vllm", choices=("vllm",))
    kv.integer("concurrency", 4, minimum=1)
    kv.flag("discoverPods", True)
    if kv.text("zmqEndpoint", ""):
        raise config_error(f"{kv.where}.zmqEndpoint: the static (bind) mode is not supported; use endpoints")
    pods = kv.section("podDiscoveryConfig")
    socket_port = pods.integer("socketPort", 5557, minimum=1, maximum=65535)
    replay_port = pods.optional_int("replaySocketPort", minimum=1, maximum=65535)
    pods.text("podLabelSelector", "")
    pods.text("podNamespace", "")
    pods.done()
    kv.done()
    timeout = p.number("replayTimeoutSeconds", 10.0, minimum=0.001)
    return SubscriberSettings(topic_filter, socket_port, replay_port, replay_timeout=timeout)


def create(name: str, params: Params, deps: PluginDeps) -> PrecisePrefixProducer:
    tp = params.section("tokenProcessorConfig")
    block = tp.integer("blockSize", 16, minimum=1, maximum=4096)
    seed = tp.text("hashSeed", "")
    tp.done()
    params.section("indexerConfig")  # accepted: the index lives in memory
    speculative = params.flag("speculativeIndexing", False)
    ttl = duration(params.text("speculativeTTL", "2s"), f"{params.where}.speculativeTTL")
    if speculative and ttl <= 0:
        raise config_error(f"{params.where}.speculativeTTL: must be > 0 with speculativeIndexing")
    settings = _subscriber_settings(params)
    index = PreciseIndex(block, seed, speculative_ttl=ttl if speculative else 0.0, clock=deps.clock.now)
    producer = PrecisePrefixProducer(name, index, settings, _local_tokenizer(params))
    if speculative and isinstance(deps.learned, SharesPlacements):  # replicas: share the speculative entries
        producer.share = deps.learned.placement_channel(f"precise:{name}", index.apply)
    return producer
