"""The simulated inference engine: a discrete-event model of vLLM's continuous-batching scheduler.

Time only moves when the caller says so: ``submit(request, now)``, ``advance(now) -> [StepResult]`` and
``next_event_time()``. An asyncio shell (:mod:`inferoute.sim.server`) keeps one timer per replica on
``next_event_time()``; unit tests drive the engine with plain numbers.

One *engine step* works like vLLM V1's scheduler iteration:

1. Scheduling, at the step's start time ``t``, with a token budget of ``max_num_batched_tokens``:
   every running sequence that finished prefill decodes one token (1 budget unit each) and gets a new KV
   block when its tokens fill the last one; when no block is free, the most recently admitted running
   request is preempted (blocks freed, back to the head of the queue, recomputed later: vLLM's recompute
   preemption) and nobody is admitted in that step. Sequences still in prefill get the next chunk of their
   uncached prompt. Then waiting requests are admitted in FIFO order while fewer than ``max_num_seqs`` run
   and budget remains. Admission needs the blocks of the prompt (cached prefix blocks are shared); if they
   do not fit, admission stops (head-of-line, as vLLM). A request for a LoRA adapter needs the adapter
   active: it is, or a slot is free, or an idle adapter can be swapped out; otherwise the request is skipped
   and keeps its place.
2. The step lasts ``step_base + step_per_seq * batch + step_per_context_token * context tokens of the
   decoding sequences + [prefill_base + prefill_per_token * prefilled tokens] + lora_load * adapters
   loaded``, all multiplied by ``time_scale``.
3. At ``t + duration`` every decoding sequence has one more token, a sequence whose prefill completed has
   its first token, finished sequences release their blocks, and the next step starts at once if there is
   work (a request arriving mid-step waits for the next step, as in vLLM).

So time to first token = queue wait + the steps that prefill the uncached prompt, and inter-token latency
grows with the batch. As a block of a running sequence fills with generated tokens (their ids are the
simulator tokenizer's ids of the generated words), it is hashed and joins the prefix cache, as in vLLM: a
follow-up turn or a resumed (preempted) sequence reuses it. Simplification (documented in docs/simulator.md):
a prompt's blocks are all allocated and cached at admission (not chunk by chunk).

KV events: with ``config.kv_events`` enabled the block hashes are vLLM's ``sha256_cbor`` chain
(:mod:`inferoute.kvevents.hashing`) and the engine records ``BlockStored`` (per run of newly cached
blocks, each physical copy), ``BlockRemoved`` (per eviction) and ``AllBlocksCleared``
(:meth:`Engine.reset_prefix_cache`).
Each completed step closes one batch; :meth:`Engine.take_event_batches` hands them to the publisher shell.
"""

from __future__ import annotations

import random
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import xxhash

from inferoute.errors import InferouteError
from inferoute.kvevents.hashing import block_digests, none_hash, wire_hash
from inferoute.kvevents.wire import AllBlocksCleared, BlockStored, KVEvent
from inferoute.sim.config import SimConfig
from inferoute.sim.kvcache import PrefixKVCache, block_hashes
from inferoute.sim.protocol import output_token_id
from inferoute.sim.stats import EngineStats

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


@dataclass(slots=True, eq=False)
class SimRequest:
    """One request inside the engine. The shell reads the progress fields; only the engine writes them."""

    request_id: str
    model: str
    """The name the client asked for (base model or adapter)."""
    prompt_tokens: Sequence[int]
    output_tokens: int
    """Planned output length (see :meth:`Engine.plan_output`)."""
    max_tokens: int
    lora: str | None = None
    tag: object = None
    """Free slot for the shell (its per-request stream)."""
    output_seed: int = 0
    """Picks the generated words (``protocol.output_token_id``), so their KV blocks can be hashed."""

    state: str = WAITING
    arrival: float = 0.0
    admitted_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    finish_reason: str | None = None
    """``length`` (hit max_tokens), ``stop`` (ended early) or ``abort``."""
    generated: int = 0
    cached_tokens: int = 0
    prefilled: int = 0
    """Prompt tokens computed so far (cached ones count as computed)."""
    blocks: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)
    """Hashes of the sequence's full blocks: the prompt's, then those filled by generated tokens."""
    digests: list[bytes] = field(default_factory=list)
    """With KV events: the full ``sha256_cbor`` digests behind ``hashes`` (the chain continues from them)."""
    last_token_at: float | None = None
    lora_waited: bool = False
    """Whether the request ever had to wait for a LoRA slot."""
    preemptions: int = 0
    prompt_len: int = field(init=False)
    """``len(prompt_tokens)``, read on every step."""
    prefill_target: int = field(init=False)
    """Tokens to compute before decoding (re)starts: the prompt, plus the output so far after a preemption."""

    def __post_init__(self) -> None:
        self.prompt_len = len(self.prompt_tokens)
        self.prefill_target = self.prompt_len

    @property
    def done(self) -> bool:
        return self.state == FINISHED

    def token_ids(self, start: int, stop: int) -> list[int]:
        """Ids of sequence positions ``start:stop`` (prompt, then generated tokens)."""
        n = self.prompt_len
        out = list(self.prompt_tokens[start:stop])
        seed = self.output_seed
        out.extend(output_token_id(seed, i - n) for i in range(max(start, n), stop))
        return out


@dataclass(slots=True)
class StepResult:
    """What one completed engine step produced, at time ``at``."""

    at: float
    progressed: list[SimRequest]
    """Requests that received one new token at ``at`` (their first, when ``first_token_at == at``)."""
    finished: list[SimRequest]
    """Requests that completed at ``at`` (also listed in ``progressed``)."""
    admitted: list[SimRequest]
    """Requests admitted when this step started."""


@dataclass(slots=True)
class _Step:
    start: float
    end: float
    decoding: list[SimRequest]
    prefilling: list[tuple[SimRequest, int]]
    admitted: list[SimRequest]


class Engine:
    """One replica's engine state (see the module docstring)."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.kv = PrefixKVCache(config.kv_cache_blocks, config.block_size)
        self.stats = EngineStats()
        self._scale = config.time_scale
        self._waiting: list[SimRequest] = []
        self._running: list[SimRequest] = []
        self._step: _Step | None = None
        self._wake: float | None = None
        self._adapters = frozenset(config.lora_adapters)
        self._loras_loaded: OrderedDict[str, None] = OrderedDict()
        self._lora_running: Counter[str] = Counter()
        self._events: list[KVEvent] | None = [] if config.kv_events.enabled else None
        self._batches: list[list[KVEvent]] = []
        self._root = none_hash(config.hash_seed)
        self.kv.events = self._events

    # -- request preparation (pure, no state change) ------------------------------------------------
    def check_lengths(self, prompt_len: int, max_tokens: int | None) -> int:
        """Validate a request's size; returns the effective ``max_tokens``.

        Raises :class:`InferouteError` 400 when the prompt plus ``max_tokens`` exceeds the context length
        or when the prompt could never fit the KV cache.
        """
        limit = self.config.max_model_len
        if max_tokens is None:
            max_tokens = limit - prompt_len
            if max_tokens < 1:
                raise InferouteError(
                    400,
                    f"This model's maximum context length is {limit} tokens. However, your request has "
                    f"{prompt_len} input tokens. Please reduce the length of the input messages.",
                    cause="context-length",
                    param="messages",
                )
        if prompt_len + max_tokens > limit:
            raise InferouteError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the messages, {max_tokens} in the "
                "completion). Please reduce the length of the messages or completion.",
                cause="context-length",
                param="max_tokens",
            )
        if prompt_len < 1:
            raise InferouteError(
                400, "The prompt must not be empty.", cause="invalid-request", param="prompt"
            )
        if self.kv.blocks_for(prompt_len + 1) > self.config.kv_cache_blocks:
            raise InferouteError(
                400,
                f"The prompt ({prompt_len} tokens) does not fit the KV cache "
                f"({self.config.kv_cache_blocks} blocks of {self.config.block_size} tokens).",
                cause="context-length",
                param="messages",
            )
        return max_tokens

    def plan_output(self, prompt_tokens: Sequence[int], max_tokens: int, ignore_eos: bool) -> int:
        """Output length: ``max_tokens`` with ``ignore_eos``, else a draw from an exponential distribution
        (mean ``mean_output_tokens``) clipped to ``[1, max_tokens]``. The draw is seeded by the config seed
        and the prompt, so the same request gets the same length on any replica, in any order."""
        if ignore_eos:
            return max_tokens
        digest = xxhash.xxh64_intdigest(
            bytes(str(len(prompt_tokens)), "ascii") + bytes(str(prompt_tokens[:64]), "ascii"),
            seed=self.config.seed,
        )
        draw = random.Random(digest).expovariate(1.0 / self.config.mean_output_tokens)
        return max(1, min(max_tokens, round(draw)))

    # -- public state ---------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        """Sequences in the batch (``vllm:num_requests_running``)."""
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        """Requests queued, preempted ones included (``vllm:num_requests_waiting``)."""
        return len(self._waiting)

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks referenced by requests (``vllm:kv_cache_usage_perc``)."""
        return self.kv.usage

    @property
    def running_loras(self) -> list[str]:
        """Adapters with running requests (``running_lora_adapters``), sorted."""
        return sorted(a for a, n in self._lora_running.items() if n > 0)

    @property
    def waiting_loras(self) -> list[str]:
        """Adapters that waiting requests ask for (``waiting_lora_adapters``), sorted."""
        return sorted({r.lora for r in self._waiting if r.lora is not None})

    @property
    def loaded_loras(self) -> list[str]:
        """Adapters occupying a slot, least recently used first."""
        return list(self._loras_loaded)

    def next_event_time(self) -> float | None:
        """When :meth:`advance` next has something to do, or None when idle."""
        if self._step is not None:
            return self._step.end
        return self._wake

    # -- transitions ----------------------------------------------------------------------------------
    def submit(self, req: SimRequest, now: float) -> None:
        """Queue a request. Raises :class:`InferouteError` 429 when the waiting queue is full."""
        if len(self._waiting) >= self.config.max_waiting:
            self.stats.rejected_queue_full += 1
            raise InferouteError(
                429, f"The waiting queue is full ({self.config.max_waiting} requests).", cause="queue-full"
            )
        if req.lora is not None and req.lora not in self._adapters:
            raise InferouteError(404, f"The model `{req.lora}` does not exist.", cause="unknown-model")
        capacity = self.config.kv_cache_blocks * self.config.block_size
        if req.prompt_len + req.output_tokens > capacity:
            # A sequence longer than the whole cache could never finish (vLLM caps max_model_len instead).
            req.output_tokens = max(1, capacity - req.prompt_len)
        req.state = WAITING
        req.arrival = now
        if not req.hashes:
            self._hash_blocks(req, 0)
        self._waiting.append(req)
        if self._step is None and self._wake is None:
            self._wake = now

    def _hash_blocks(self, req: SimRequest, upto: int) -> list[int]:
        """Hash the sequence's full blocks after those in ``req.hashes`` (the prompt's when ``upto`` is 0,
        else up to position ``upto``); appends and returns the new hashes."""
        bs = self.config.block_size
        start = len(req.hashes)
        tokens = req.prompt_tokens if upto == 0 else req.token_ids(start * bs, upto)
        if self._events is None:
            parent = req.hashes[-1] if req.hashes else None
            ns = req.lora or self.config.model
            new = block_hashes(tokens, bs, ns, self.config.seed, parent, 0 if upto else start)
        else:
            extra = (req.lora,) if req.lora is not None else None
            prev = req.digests[-1] if req.digests else None
            digests = block_digests(tokens, bs, self._root, extra, prev, 0 if upto else start)
            req.digests.extend(digests)
            new = [wire_hash(d) for d in digests]
        req.hashes.extend(new)
        return new

    def _stored(self, req: SimRequest, first: int, stop: int) -> None:
        """Record a ``BlockStored`` for the sequence's blocks ``first:stop`` (newly cached)."""
        if self._events is None or stop <= first:
            return
        bs = self.config.block_size
        n = stop - first
        extra = (req.lora,) if req.lora is not None else None
        self._events.append(
            BlockStored(
                tuple(req.hashes[first:stop]),
                req.hashes[first - 1] if first else None,
                tuple(req.token_ids(first * bs, stop * bs)),
                bs,
                req.lora,
                (extra,) * n,
            )
        )

    def _cache_generated(self, req: SimRequest) -> None:
        """Blocks filled by generated tokens whose KV is computed join the prefix cache."""
        computed = req.prompt_len + req.generated - 1  # the newest token's KV is written by the next step
        full = min(computed // self.config.block_size, len(req.blocks))
        if full <= len(req.hashes):
            return
        first = len(req.hashes)
        new = self._hash_blocks(req, full * self.config.block_size)
        stored_from = None
        for i, h in enumerate(new, first):
            if self.kv.cache_block(req.blocks[i], h):
                stored_from = i if stored_from is None else stored_from
        if stored_from is not None:
            self._stored(req, stored_from, first + len(new))

    def reset_prefix_cache(self) -> bool:
        """vLLM's ``/reset_prefix_cache``: refused (False) while requests hold blocks; records
        ``AllBlocksCleared`` in a batch of its own."""
        if not self.kv.reset():
            return False
        if self._events is not None:
            if self._events:
                self._batches.append(list(self._events))
                self._events.clear()
            self._batches.append([AllBlocksCleared()])
        return True

    def take_event_batches(self) -> list[list[KVEvent]]:
        """The KV-event batches of the steps completed since the last call (oldest first)."""
        out, self._batches = self._batches, []
        return out

    def abort(self, req: SimRequest, now: float) -> None:
        """Drop a request (client went away). Its blocks are released; idempotent."""
        if req.state == FINISHED:
            return
        if req.state == WAITING:
            self._waiting.remove(req)
        else:
            self._running.remove(req)
            self._release(req)
            if self._step is not None:
                step = self._step
                if req in step.decoding:
                    step.decoding.remove(req)
                step.prefilling = [(r, n) for r, n in step.prefilling if r is not req]
        self._finish(req, now, "abort")

    def advance(self, now: float) -> list[StepResult]:
        """Complete every step that ends at or before ``now`` and start the following ones."""
        results: list[StepResult] = []
        while True:
            step = self._step
            if step is None:
                if self._wake is None or self._wake > now:
                    return results
                start, self._wake = self._wake, None
                self._begin_step(start)
                continue
            if step.end > now:
                return results
            results.append(self._complete_step(step))
            self._begin_step(step.end)

    # -- internals ------------------------------------------------------------------------------------
    def _begin_step(self, t: float) -> None:
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        preempted = self.stats.preemptions
        decoding = self._grow_for_decode([r for r in self._running if r.prefilled >= r.prefill_target])
        budget -= len(decoding)
        prefilling: list[tuple[SimRequest, int]] = []
        for r in self._running:
            if r.prefilled < r.prefill_target and budget > 0:
                chunk = min(r.prefill_target - r.prefilled, budget)
                prefilling.append((r, chunk))
                budget -= chunk
        if self.stats.preemptions == preempted:
            admitted, loads = self._admit(t, budget, prefilling)
        else:  # as vLLM: a step that had to preempt admits nobody
            admitted, loads = [], 0
        batch = len(decoding) + len(prefilling)
        if batch == 0:
            self._step = None
            return
        prefill_tokens = sum(n for _, n in prefilling)
        duration = cfg.step_base_s + cfg.step_per_seq_s * batch + cfg.lora_load_s * loads
        if cfg.step_per_context_token_s:  # attention reads every decoding sequence's whole KV
            duration += cfg.step_per_context_token_s * sum(r.prompt_len + r.generated for r in decoding)
        if prefill_tokens:
            duration += cfg.prefill_base_s + cfg.prefill_per_token_s * prefill_tokens
        self._step = _Step(t, t + duration * self._scale, decoding, prefilling, admitted)

    def _grow_for_decode(self, decoding: list[SimRequest]) -> list[SimRequest]:
        """Give each decoding sequence (oldest first) a block for the token it feeds this step, preempting
        the most recently admitted running request while none is free. Returns those still running."""
        kv = self.kv
        for r in decoding:
            if r.state != RUNNING:
                continue  # preempted for an older sequence earlier in this loop
            need = kv.blocks_for(r.prompt_len + r.generated)
            while len(r.blocks) < need and not kv.grow(r.blocks):
                victim = self._running[-1]
                self._preempt(victim)
                if victim is r:
                    break
        return [r for r in decoding if r.state == RUNNING]

    def _preempt(self, req: SimRequest) -> None:
        """vLLM's recompute preemption: free the blocks, go back to the head of the queue; on re-admission
        the prompt and the output so far are prefilled again (cached prompt blocks still hit)."""
        self._running.remove(req)
        self._release(req)
        req.state = WAITING
        req.prefilled = 0
        req.prefill_target = req.prompt_len + req.generated
        req.preemptions += 1
        self.stats.preemptions += 1
        self._waiting.insert(0, req)

    def _admit(
        self, t: float, budget: int, prefilling: list[tuple[SimRequest, int]]
    ) -> tuple[list[SimRequest], int]:
        admitted: list[SimRequest] = []
        loads = 0
        if not self._waiting:
            return admitted, loads
        cfg = self.config
        kept: list[SimRequest] = []
        blocked = False
        for req in self._waiting:
            if blocked or budget <= 0 or len(self._running) >= cfg.max_num_seqs:
                kept.append(req)
                continue
            lora_load = 0
            if req.lora is not None:
                lora_load = self._lora_slot(req.lora)
                if lora_load < 0:
                    kept.append(req)  # skipped: keeps its place, later requests may go first
                    if not req.lora_waited:
                        req.lora_waited = True
                        self.stats.lora_slot_waits += 1
                    continue
            need = self.kv.blocks_for(req.prefill_target)
            got = self.kv.allocate(req.hashes, need, (req.prefill_target - 1) // cfg.block_size)
            if got is None:
                if lora_load and req.lora is not None:
                    self._loras_loaded.pop(req.lora, None)
                blocked = True
                kept.append(req)
                continue
            req.blocks, hit_blocks = got
            self._stored(req, hit_blocks, min(need, len(req.hashes)))
            loads += lora_load
            stats = self.stats
            stats.lora_loads += lora_load
            req.prefilled = hit_blocks * cfg.block_size
            stats.prefix_queries += req.prompt_len
            stats.prefix_hits += req.prefilled
            if req.admitted_at is None:  # first admission (not a resumption after preemption)
                req.admitted_at = t
                req.cached_tokens = req.prefilled
                stats.prompt_tokens += req.prompt_len
                stats.queue.observe(t - req.arrival)
            req.state = RUNNING
            if req.lora is not None:
                self._lora_running[req.lora] += 1
            self._running.append(req)
            admitted.append(req)
            chunk = min(req.prefill_target - req.prefilled, budget)
            prefilling.append((req, chunk))
            budget -= chunk
        if admitted:
            self._waiting = kept
        return admitted, loads

    def _lora_slot(self, adapter: str) -> int:
        """1 if ``adapter`` must be loaded (a slot was taken for it), 0 if active, -1 if no slot."""
        loaded = self._loras_loaded
        if adapter in loaded:
            loaded.move_to_end(adapter)
            return 0
        if len(loaded) >= self.config.max_loras:
            idle = next((a for a in loaded if self._lora_running[a] == 0), None)
            if idle is None:
                return -1
            del loaded[idle]
        loaded[adapter] = None
        return 1

    def _complete_step(self, step: _Step) -> StepResult:
        at = step.end
        self._step = None
        progressed: list[SimRequest] = []
        finished: list[SimRequest] = []
        stats = self.stats
        for r in step.decoding:
            r.generated += 1
            r.last_token_at = at
            progressed.append(r)
        if step.decoding:
            stats.itl.observe(at - step.start, len(step.decoding))
        for r, chunk in step.prefilling:
            r.prefilled += chunk
            if r.prefilled >= r.prefill_target:
                r.generated += 1  # the step that completes a (re)prefill also samples the next token
                r.last_token_at = at
                progressed.append(r)
                if r.first_token_at is None:
                    r.first_token_at = at
                    stats.ttft.observe(at - r.arrival)
        stats.generation_tokens += len(progressed)
        for r in progressed:
            self._cache_generated(r)
            if r.generated >= r.output_tokens:
                self._running.remove(r)
                self._release(r)
                self._finish(r, at, "length" if r.generated >= r.max_tokens else "stop")
                finished.append(r)
        if self._events:
            self._batches.append(list(self._events))
            self._events.clear()
        return StepResult(at, progressed, finished, step.admitted)

    def _release(self, req: SimRequest) -> None:
        self.kv.release(req.blocks)
        req.blocks = []
        if req.lora is not None:
            self._lora_running[req.lora] -= 1

    def _finish(self, req: SimRequest, now: float, reason: str) -> None:
        req.state = FINISHED
        req.finished_at = now
        req.finish_reason = reason
        self.stats.success[reason] = self.stats.success.get(reason, 0) + 1
        if reason == "abort":
            return
        stats = self.stats
        stats.e2e.observe(now - req.arrival)
        stats.prompt_len.observe(req.prompt_len)
        stats.generation_len.observe(req.generated)
        stats.max_tokens_param.observe(req.max_tokens)
        if req.admitted_at is not None and req.first_token_at is not None:
            stats.prefill.observe(req.first_token_at - req.admitted_at)
            stats.decode.observe(now - req.first_token_at)
            stats.inference.observe(now - req.admitted_at)
            if req.generated > 1:
                stats.tpot.observe((now - req.first_token_at) / (req.generated - 1))
