"""``predicted-ttft-scorer`` (inferoute): prefer the endpoint with the lowest predicted time to first token.

Like NVIDIA Dynamo's KV-router cost (prefill blocks still to compute + decode load), in seconds:

    ahead      = max(waiting, pending)                      requests queued before ours
    known      = pending_tokens x prefillSecondsPerToken + pending x requestOverheadSeconds
    per_queued = known / pending, or queuedRequestSeconds when nothing is pending
    queue_wait = ahead x per_queued
    uncached   = prompt_tokens x (1 - matched_blocks / hashed_blocks)
    prefill    = requestOverheadSeconds + uncached x prefillSecondsPerToken
    decode     = running x decodeSecondsPerRunning x (1 + ahead)
    lora       = 0 if the adapter is running there, or was sent there recently and a slot is free (servers
                 keep recently used adapters loaded, which ``running_lora_adapters`` does not show);
                 loraLoadSeconds if a slot is free; loraSlotWaitSeconds if it must wait for a slot
                 (only for models some candidate reports as a running or waiting adapter)
    predicted  = queue_wait + prefill + decode + lora  (+ kvPenaltySeconds when kv_usage ≥ kvThreshold)
    evicted    = max(0, uncached - (num_gpu_blocks x block_size - held_tokens))
    cost       = predicted + evicted x prefillSecondsPerToken x evictionCostWeight

``waiting`` / ``running`` / ``kv_usage`` are scraped; ``pending`` / ``pending_tokens`` are this picker's own
not-yet-answered requests (fresher than any scrape; with a cross-replica syncer, every picker's) and the
tokens they still have to prefill there; ``matched_blocks`` comes from the approximate prefix index. A queued
request the picker did not send (another router's, or one the scrape shows before the picker's own count does)
is priced like the ones it knows there: on a replica serving cached prefixes a queued request costs a short
prefill, not a full one. Only when nothing of ours is pending there does it cost ``queuedRequestSeconds``.

**Evictions.** A miss on a server whose KV cache is full evicts as many tokens of other prefixes there as it
prefills, and some later request prefills those again: the TTFT of this request does not show that cost, so
on a full pool the prediction alone moves requests off their prefix's replica as soon as it queues a little,
and the misses it makes evict more (on the kv-pressure benchmark, hit rate 88% where ``gie-default`` keeps
98%). ``held_tokens`` is what the prefix store counts on that server (the approximate index's remembered
blocks, or the blocks the server's KV events say it holds), its capacity ``num_gpu_blocks x block_size`` from
the server's ``cache_config_info``; ``evicted`` is the part of the uncached prompt that does not fit in the
rest (0 while the cache has room, or when the server does not report its capacity). ``evictionCostWeight`` is
the share of evicted tokens expected to be prefilled again (1: all of them, as when the prefixes in use fill
the pool).

Score: ``min_cost / cost`` — the cheapest endpoint scores 1, one twice as costly 0.5. A ratio (not min-max)
keeps near-ties near-equal, so a small-weight scorer such as ``prefix-cache-scorer`` can break them toward
cache affinity instead of a 1% difference deciding.

**SLO-aware.** A request with a TTFT objective (``x-llm-d-slo-ttft-ms``, alias ``x-slo-ttft-ms``) is scored by
headroom = SLO - predicted, as the reference's ``latency-scorer`` does: when some endpoint has positive
headroom only those score (the others 0), by ``headroomSelectionStrategy`` -- ``least`` (the reference's
default: bin-pack, the endpoint that meets the SLO with the least to spare scores 1, keeping the fastest
ones free for tighter requests) or ``most`` (the most headroom scores 1); when none has, the one predicted
fastest scores 1 (the ratio above: the smallest violation). Without the header nothing changes.

Parameters (defaults: a 7-8B model on one H100, the same profile the simulator models):
``prefillSecondsPerToken`` (0.00008, ~12.5k prompt tokens/s), ``requestOverheadSeconds`` (0.03: the engine
step that carries the prefill), ``queuedRequestSeconds`` (0.07: prefill of a queued request where we know of
none, ~500 tokens), ``decodeSecondsPerRunning`` (0.00005: each running sequence lengthens every engine step),
``kvThreshold`` (0.95), ``kvPenaltySeconds`` (1.0: preemption/queueing risk when the KV cache is full),
``evictionCostWeight`` (1.0; 0 scores by predicted TTFT alone),
``loraLoadSeconds`` (0.05: loading an adapter into a free slot) and ``loraSlotWaitSeconds`` (0.7: waiting for
a busy adapter slot to drain, about one request's decode), ``headroomSelectionStrategy`` (``least``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from inferoute.epp.plugin import Params, PluginDeps
from inferoute.epp.scheduling.types import Candidate, CycleContext

TYPE = "predicted-ttft-scorer"
ROLE = "scorer"
STRATEGIES = ("least", "most")


@dataclass(frozen=True, slots=True)
class TTFTModel:
    prefill_s_per_token: float = 0.00008
    request_overhead_s: float = 0.03
    queued_request_s: float = 0.07
    decode_s_per_running: float = 0.00005
    kv_threshold: float = 0.95
    kv_penalty_s: float = 1.0
    lora_load_s: float = 0.05
    lora_slot_wait_s: float = 0.7
    eviction_weight: float = 1.0


class PredictedTTFTScorer:
    type_name: ClassVar[str] = TYPE

    def __init__(self, name: str, model: TTFTModel | None = None, strategy: str = "least") -> None:
        self.name = name
        self.model = model or TTFTModel()
        self.strategy = strategy
        """``least`` or ``most``: which positive-headroom endpoint an SLO request prefers."""
        self._sent: dict[str, OrderedDict[str, None]] = {}
        """Adapters recently sent to each endpoint (most recent last, at most its ``max_lora``)."""
        self._cycle: tuple[CycleContext, Sequence[Candidate], bool] | None = None
        """(cycle, candidates, is the target an adapter) of the cycle being scored."""

    def _is_adapter(self, ctx: CycleContext, candidates: Sequence[Candidate]) -> bool:
        """Whether the target model is a LoRA adapter: some candidate reports it running or waiting, or we
        sent it somewhere as one. Computed once per cycle (``predict`` and ``on_picked`` see the same
        candidate list)."""
        if self._cycle is not None and self._cycle[0] is ctx and self._cycle[1] is candidates:
            return self._cycle[2]
        target = ctx.request.target_model
        found = False
        for sent in self._sent.values():
            if target in sent:
                found = True
                break
        else:
            for c in candidates:
                met = c.metrics
                if target in met.active_adapters or target in met.waiting_adapters:
                    found = True
                    break
        self._cycle = (ctx, candidates, found)
        return found

    def on_picked(self, ctx: CycleContext, picked: Candidate, candidates: Sequence[Candidate]) -> None:
        is_adapter = self._is_adapter(ctx, candidates)
        self._cycle = None
        if not is_adapter:
            return
        target = ctx.request.target_model
        sent = self._sent.get(picked.key)
        if sent is None:
            sent = self._sent[picked.key] = OrderedDict()
        sent[target] = None
        sent.move_to_end(target)
        while len(sent) > max(1, picked.metrics.max_lora):
            sent.popitem(last=False)

    @staticmethod
    def _uncached(ctx: CycleContext, candidates: Sequence[Candidate]) -> list[float]:
        """Prompt tokens each candidate would prefill: those past the leading blocks it holds."""
        prompt_tokens = ctx.request.prompt_tokens
        hashes = ctx.prefix_hashes(candidates)
        if not hashes:
            return [float(prompt_tokens)] * len(candidates)
        matched = ctx.prefix_match(candidates).get
        per_block = prompt_tokens / len(hashes)
        return [prompt_tokens - matched(c.key, 0) * per_block for c in candidates]

    def predict(
        self, ctx: CycleContext, candidates: Sequence[Candidate], uncached: Sequence[float] | None = None
    ) -> list[float]:
        """Predicted seconds to first token on each candidate (``uncached``: its :meth:`_uncached`)."""
        m = self.model
        req = ctx.request
        if uncached is None:
            uncached = self._uncached(ctx, candidates)
        queued_s, overhead_s, prefill_s = m.queued_request_s, m.request_overhead_s, m.prefill_s_per_token
        decode_s, kv_threshold, kv_penalty_s = m.decode_s_per_running, m.kv_threshold, m.kv_penalty_s
        out: list[float] = []
        append = out.append
        for c, prefill in zip(candidates, uncached, strict=True):  # the module docstring's formula, in order
            met = c.metrics
            inf = c.inflight
            waiting = met.waiting
            pending = inf.pending
            ahead = pending if pending > waiting else waiting  # max(waiting, pending)
            if pending:
                known = inf.pending_tokens * prefill_s + pending * overhead_s
                queue_wait = known if pending >= waiting else known / pending * waiting
            else:
                queue_wait = waiting * queued_s
            t = queue_wait + overhead_s + prefill * prefill_s
            t += met.running * decode_s * (1.0 + ahead)
            if met.kv_usage >= kv_threshold:
                t += kv_penalty_s
            append(t)
        if self._is_adapter(ctx, candidates):
            self._add_lora(req.target_model, candidates, out)
        return out

    def _add_lora(self, target: str, candidates: Sequence[Candidate], predicted: list[float]) -> None:
        """Add the adapter's loading or slot wait where it is not loaded."""
        m = self.model
        sent_to = self._sent
        for i, c in enumerate(candidates):
            met = c.metrics
            if target in met.active_adapters:
                continue
            busy = len(met.active_adapters) + len(met.waiting_adapters)
            if target in met.waiting_adapters or busy >= (met.max_lora or 1):
                predicted[i] += m.lora_slot_wait_s
            elif target not in sent_to.get(c.key, ()):
                predicted[i] += m.lora_load_s

    def eviction_cost(
        self, ctx: CycleContext, candidates: Sequence[Candidate], uncached: Sequence[float] | None = None
    ) -> list[float]:
        """Seconds of prefill the evictions a pick on each candidate causes would cost later requests
        (``uncached``: its :meth:`_uncached`)."""
        weight = self.model.eviction_weight
        if weight <= 0 or not ctx.prefix_hashes(candidates):
            return [0.0] * len(candidates)
        if uncached is None:
            uncached = self._uncached(ctx, candidates)
        per_token = self.model.prefill_s_per_token * weight
        held = ctx.learned.held_tokens
        out: list[float] = []
        for c, prefill in zip(candidates, uncached, strict=True):
            met = c.metrics
            if not met.num_gpu_blocks or not met.block_size:
                out.append(0.0)
                continue
            room = met.num_gpu_blocks * met.block_size - held(c.key)
            out.append(max(0.0, prefill - max(0, room)) * per_token)
        return out

    def score(self, ctx: CycleContext, candidates: Sequence[Candidate]) -> list[float]:
        uncached = self._uncached(ctx, candidates)
        predicted = self.predict(ctx, candidates, uncached)
        if not predicted:
            return []
        slo = ctx.request.slo_ttft
        if slo is None:
            evicted = self.eviction_cost(ctx, candidates, uncached)
            predicted = [t + e for t, e in zip(predicted, evicted, strict=True)]
        else:
            headroom = [slo - t for t in predicted]
            positive = [h for h in headroom if h > 0]
            if positive:
                if self.strategy == "most":
                    top = max(positive)
                    return [h / top if h > 0 else 0.0 for h in headroom]
                low = min(positive)
                return [low / h if h > 0 else 0.0 for h in headroom]
        best = min(predicted)
        if best <= 0.0:
            return [1.0 if t <= 0.0 else 0.0 for t in predicted]
        return [best / t for t in predicted]


def create(name: str, params: Params, deps: PluginDeps) -> PredictedTTFTScorer:
    model = model_params(params)
    return PredictedTTFTScorer(
        name, model, params.text("headroomSelectionStrategy", "least", choices=STRATEGIES)
    )


def model_params(params: Params) -> TTFTModel:
    """The latency model from the same parameters the scorer takes (the SLO admitter shares them)."""
    return TTFTModel(
        prefill_s_per_token=params.number("prefillSecondsPerToken", 0.00008, minimum=0),
        request_overhead_s=params.number("requestOverheadSeconds", 0.03, minimum=0),
        queued_request_s=params.number("queuedRequestSeconds", 0.07, minimum=0),
        decode_s_per_running=params.number("decodeSecondsPerRunning", 0.00005, minimum=0),
        kv_threshold=params.number("kvThreshold", 0.95, minimum=0, maximum=1),
        kv_penalty_s=params.number("kvPenaltySeconds", 1.0, minimum=0),
        lora_load_s=params.number("loraLoadSeconds", 0.05, minimum=0),
        lora_slot_wait_s=params.number("loraSlotWaitSeconds", 0.7, minimum=0),
        eviction_weight=params.number("evictionCostWeight", 1.0, minimum=0),
    )
