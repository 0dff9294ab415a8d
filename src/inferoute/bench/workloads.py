"""Seeded, open-loop workloads for routing benchmarks (pure: no I/O, no clock).

A workload turns ``(rate, duration, seed)`` into a list of :class:`PlannedRequest` — the exact
request bodies and their arrival offsets. The same seed gives byte-identical plans, so every contender
sees the same traffic.

Four workloads (issue 6):

* ``shared-prefix`` — inference-perf's ``shared_prefix``: ``groups`` system prompts x
  ``users_per_group`` fixed questions; each request picks a (group, user) uniformly. Poisson arrivals.
* ``multi-lora`` — short prompts addressed to LoRA adapters drawn from a skewed mix with more
  adapters than the pool has adapter slots. Poisson arrivals.
* ``long-prompt`` — a few 100-200 KB documents, each request is one document plus a short question.
* ``bursty`` — shared-prefix traffic whose arrivals come in Poisson-timed bursts (same mean rate).
* ``kv-pressure`` — many prefix groups whose working set is ~72% of the pool's total KV capacity, so a router
  must partition groups across replicas and evictions happen (issue 15).

Lengths are in *tokens* as the simulator counts them (:data:`CHARS_PER_TOKEN` characters per token); each
workload also says how to size the simulator pool (:class:`SimSizing`) so the working set fills about
:data:`TARGET_KV_FILL` of the pool's total KV capacity — the regime where routing decides cache hits.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

CHARS_PER_TOKEN = 4
"""How the simulator (and GIE's tokenizer-free prefix estimator) count tokens: ~4 characters each."""

TARGET_KV_FILL = 0.75
"""Working set / total KV capacity of the pool that workloads aim for."""

BLOCK_SIZE = 16
"""KV block size (tokens) assumed when sizing the simulator's cache."""

MODEL = "meta-llama/Llama-3.1-8B-Instruct"

_ALPHABET = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True, slots=True)
class PlannedRequest:
    """One request of a workload: what to send and when (seconds after the run starts)."""

    index: int
    at: float
    path: str
    body: bytes
    model: str
    max_tokens: int
    group: str
    """A label for per-group analysis: the system-prompt group, the adapter or the document."""
    prompt_tokens: int
    """Prompt length in simulator tokens (estimate: characters / CHARS_PER_TOKEN)."""
    headers: tuple[tuple[str, str], ...] = ()
    """Request headers of this request only (tenant, objective)."""


@dataclass(frozen=True, slots=True)
class SimSizing:
    """How to start the simulator pool for a workload (passed to ``inferoute sim``)."""

    replicas: int
    kv_cache_blocks: int
    max_num_seqs: int
    model: str = MODEL
    lora_adapters: tuple[str, ...] = ()
    max_loras: int = 1
    max_model_len: int = 32768

    def describe(self) -> str:
        text = (
            f"{self.replicas} replicas x {self.kv_cache_blocks} KV blocks ({BLOCK_SIZE} tokens), "
            f"max-num-seqs {self.max_num_seqs}"
        )
        if self.lora_adapters:
            text += f", {len(self.lora_adapters)} adapters, max-loras {self.max_loras}"
        return text


def words(rng: random.Random, tokens: int) -> str:
    """Deterministic filler text of ``tokens`` simulator tokens (``CHARS_PER_TOKEN`` chars per token)."""
    # Each token is a space and three random letters (one "word" for the simulator's tokenizer); distinct
    # texts share no accidental prefix, and texts concatenate without merging tokens.
    letters = _ALPHABET
    return "".join(
        " " + rng.choice(letters) + rng.choice(letters) + rng.choice(letters) for _ in range(tokens)
    )


def poisson_arrivals(rng: random.Random, rate: float, duration: float) -> list[float]:
    """Arrival offsets of a Poisson process of ``rate`` per second over ``[0, duration)``."""
    if rate <= 0 or duration <= 0:
        return []
    out: list[float] = []
    t = rng.expovariate(rate)
    while t < duration:
        out.append(t)
        t += rng.expovariate(rate)
    return out


def burst_arrivals(
    rng: random.Random, rate: float, duration: float, mean_burst: float, spread: float
) -> list[float]:
    """Poisson bursts: burst epochs at ``rate / mean_burst`` per second, each of
    ``1 + Poisson(mean_burst - 1)`` requests separated by exponential gaps of mean ``spread`` seconds.
    The long-run mean rate is ``rate``."""
    if rate <= 0 or duration <= 0:
        return []
    out: list[float] = []
    for epoch in poisson_arrivals(rng, rate / mean_burst, duration):
        size = 1 + _poisson(rng, mean_burst - 1)
        t = epoch
        for _ in range(size):
            if t >= duration:
                break
            out.append(t)
            t += rng.expovariate(1 / spread)
    out.sort()
    return out


def _poisson(rng: random.Random, mean: float) -> int:
    if mean <= 0:
        return 0
    # Knuth's method: fine for the small means used here.
    limit, k, p = math.exp(-mean), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def completion_body(model: str, prompt: str, max_tokens: int) -> bytes:
    """A streaming ``/v1/completions`` body that asks for exactly ``max_tokens`` tokens and usage."""
    return json.dumps(
        {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        separators=(",", ":"),
    ).encode()


def kv_blocks_for(working_set_tokens: int, replicas: int, fill: float = TARGET_KV_FILL) -> int:
    """Blocks per replica such that ``working_set_tokens`` is ``fill`` of the pool's total KV capacity."""
    return max(64, math.ceil(working_set_tokens / (fill * replicas * BLOCK_SIZE)))


class Workload:
    """Base class: a named, parameterised traffic generator (subclasses define the content)."""

    name: str = ""
    summary: str = ""
    per_group: bool = False
    """Report each request group separately (p90 TTFT, goodput, 429s per group)."""

    def sizing(self, replicas: int) -> SimSizing:
        raise NotImplementedError

    def arrivals(self, rng: random.Random, rate: float, duration: float) -> list[float]:
        return poisson_arrivals(rng, rate, duration)

    def plan(self, rate: float, duration: float, seed: int) -> list[PlannedRequest]:
        """The requests of one run: deterministic in ``(rate, duration, seed)``."""
        arrivals = self.arrivals(random.Random(f"{seed}:arrivals:{rate}"), rate, duration)
        choose = random.Random(f"{seed}:choices:{rate}")
        return [self.request(i, at, choose, seed) for i, at in enumerate(arrivals)]

    def request(self, index: int, at: float, rng: random.Random, seed: int) -> PlannedRequest:
        raise NotImplementedError

    def parameters(self) -> dict[str, object]:
        raise NotImplementedError


@dataclass
class SharedPrefix(Workload):
    """inference-perf ``shared_prefix``: groups x users, system prompt, question and output lengths."""

    groups: int = 8
    users_per_group: int = 16
    system_prompt_len: int = 6000
    question_len: int = 128
    output_len: int = 32
    name: str = "shared-prefix"
    summary: str = "groups x users sharing a long system prompt (inference-perf shared_prefix)"
    _texts: dict[tuple[int, int], str] = field(default_factory=dict, repr=False)

    def working_set_tokens(self) -> int:
        return self.groups * (self.system_prompt_len + self.users_per_group * self.question_len)

    def sizing(self, replicas: int) -> SimSizing:
        return SimSizing(
            replicas=replicas,
            kv_cache_blocks=kv_blocks_for(self.working_set_tokens(), replicas),
            max_num_seqs=32,
        )

    def _prompt(self, seed: int, group: int, user: int) -> str:
        key = (seed, group * 100_000 + user)
        text = self._texts.get(key)
        if text is None:
            system = self._texts.get((seed, -1 - group))
            if system is None:
                system = words(random.Random(f"{seed}:system:{group}"), self.system_prompt_len)
                self._texts[(seed, -1 - group)] = system
            text = system + words(random.Random(f"{seed}:question:{group}:{user}"), self.question_len)
            self._texts[key] = text
        return text

    def request(self, index: int, at: float, rng: random.Random, seed: int) -> PlannedRequest:
        group = rng.randrange(self.groups)
        user = rng.randrange(self.users_per_group)
        prompt = self._prompt(seed, group, user)
        return PlannedRequest(
            index,
            at,
            "/v1/completions",
            completion_body(MODEL, prompt, self.output_len),
            MODEL,
            self.output_len,
            f"g{group}",
            self.system_prompt_len + self.question_len,
        )

    def parameters(self) -> dict[str, object]:
        return {
            "groups": self.groups,
            "users_per_group": self.users_per_group,
            "system_prompt_len": self.system_prompt_len,
            "question_len": self.question_len,
            "output_len": self.output_len,
        }


@dataclass
class Bursty(SharedPrefix):
    """Shared-prefix content with Poisson-timed bursts of ``mean_burst`` requests ``spread`` seconds apart."""

    mean_burst: float = 8.0
    spread: float = 0.01
    name: str = "bursty"
    summary: str = "shared-prefix content arriving in Poisson-timed bursts"

    def arrivals(self, rng: random.Random, rate: float, duration: float) -> list[float]:
        return burst_arrivals(rng, rate, duration, self.mean_burst, self.spread)

    def parameters(self) -> dict[str, object]:
        return {**super().parameters(), "mean_burst": self.mean_burst, "spread_s": self.spread}


@dataclass
class KVPressure(SharedPrefix):
    """Shared-prefix content with many groups, sized so the working set is ``fill`` of the pool's KV."""

    groups: int = 40
    users_per_group: int = 8
    system_prompt_len: int = 2400
    question_len: int = 64
    output_len: int = 64
    fill: float = 0.72
    name: str = "kv-pressure"
    summary: str = (
        "many prefix groups, working set ~72% of the pool's KV capacity: placement must partition groups"
    )

    def sizing(self, replicas: int) -> SimSizing:
        return SimSizing(
            replicas=replicas,
            kv_cache_blocks=kv_blocks_for(self.working_set_tokens(), replicas, self.fill),
            max_num_seqs=32,
        )

    def parameters(self) -> dict[str, object]:
        return {**super().parameters(), "fill": self.fill}


@dataclass
class MultiLora(Workload):
    """Requests to ``adapters`` LoRA adapters (Zipf-like mix, exponent ``skew``); the pool has fewer slots."""

    adapters: int = 12
    max_loras: int = 2
    skew: float = 0.8
    prompt_len: int = 256
    output_len: int = 64
    name: str = "multi-lora"
    summary: str = "a skewed adapter mix with more adapters than the pool has adapter slots"

    def adapter_names(self) -> tuple[str, ...]:
        return tuple(f"lora-{i}" for i in range(self.adapters))

    def weights(self) -> list[float]:
        return [1.0 / (i + 1) ** self.skew for i in range(self.adapters)]

    def sizing(self, replicas: int) -> SimSizing:
        return SimSizing(
            replicas=replicas,
            kv_cache_blocks=kv_blocks_for(self.adapters * 8 * self.prompt_len, replicas),
            max_num_seqs=32,
            lora_adapters=self.adapter_names(),
            max_loras=self.max_loras,
        )

    def request(self, index: int, at: float, rng: random.Random, seed: int) -> PlannedRequest:
        names = self.adapter_names()
        adapter = rng.choices(names, weights=self.weights())[0]
        prompt = words(random.Random(f"{seed}:lora:{index}"), self.prompt_len)
        return PlannedRequest(
            index,
            at,
            "/v1/completions",
            completion_body(adapter, prompt, self.output_len),
            adapter,
            self.output_len,
            adapter,
            self.prompt_len,
        )

    def parameters(self) -> dict[str, object]:
        return {
            "adapters": self.adapters,
            "max_loras": self.max_loras,
            "skew": self.skew,
            "prompt_len": self.prompt_len,
            "output_len": self.output_len,
        }


@dataclass
class LongPrompt(Workload):
    """``documents`` documents of 100-200 KB; each request is one document plus a short question."""

    documents: int = 5
    min_kb: int = 100
    max_kb: int = 200
    question_len: int = 32
    output_len: int = 16
    name: str = "long-prompt"
    summary: str = "100-200 KB prompts: a few large documents, each with many short questions"
    _docs: dict[tuple[int, int], str] = field(default_factory=dict, repr=False)

    def doc_tokens(self, seed: int, doc: int) -> int:
        kb = random.Random(f"{seed}:doclen:{doc}").randint(self.min_kb, self.max_kb)
        return kb * 1000 // CHARS_PER_TOKEN

    def sizing(self, replicas: int) -> SimSizing:
        mean_tokens = (self.min_kb + self.max_kb) / 2 * 1000 / CHARS_PER_TOKEN
        longest = self.max_kb * 1000 // CHARS_PER_TOKEN + self.question_len + self.output_len
        # Every replica must fit the longest request with room to spare, or it could never be admitted.
        blocks = max(
            kv_blocks_for(int(self.documents * mean_tokens), replicas), math.ceil(1.3 * longest / BLOCK_SIZE)
        )
        return SimSizing(
            replicas=replicas,
            kv_cache_blocks=blocks,
            max_num_seqs=16,
            max_model_len=1 << math.ceil(math.log2(longest)),
        )

    def _doc(self, seed: int, doc: int) -> str:
        text = self._docs.get((seed, doc))
        if text is None:
            text = words(random.Random(f"{seed}:doc:{doc}"), self.doc_tokens(seed, doc))
            self._docs[(seed, doc)] = text
        return text

    def request(self, index: int, at: float, rng: random.Random, seed: int) -> PlannedRequest:
        doc = rng.randrange(self.documents)
        prompt = self._doc(seed, doc) + words(random.Random(f"{seed}:q:{index}"), self.question_len)
        return PlannedRequest(
            index,
            at,
            "/v1/completions",
            completion_body(MODEL, prompt, self.output_len),
            MODEL,
            self.output_len,
            f"doc{doc}",
            self.doc_tokens(seed, doc) + self.question_len,
        )

    def parameters(self) -> dict[str, object]:
        return {
            "documents": self.documents,
            "kb": [self.min_kb, self.max_kb],
            "question_len": self.question_len,
            "output_len": self.output_len,
        }


OVERLOAD_SEQS = 8
"""Sequences per replica in the overload workload; the bench's flow-control profile's ``maxConcurrency``."""


@dataclass
class Overload(Workload):
    """Two tenants (3:1) and two priorities at 1.5-2x the pool's capacity.

    Each request belongs to ``tenant-a`` (75%) or ``tenant-b`` (25%) (``x-llm-d-inference-fairness-id``) and
    is ``interactive`` (30%: short answer, objective priority 10) or ``batch`` (70%: long answer, sheddable,
    priority -1) (``x-llm-d-inference-objective``). The pool runs ``OVERLOAD_SEQS`` sequences per replica,
    so its capacity is about ``replicas x 8 / mean request time`` (~1 s at time scale 1: ~32 req/s on 4
    replicas); the default rates offer 1.5x and 2x that. Groups are ``<tenant>/<class>``.
    """

    prompt_len: int = 256
    interactive_output: int = 16
    batch_output: int = 128
    interactive_share: float = 0.3
    tenant_a_share: float = 0.75
    per_group: bool = True
    name: str = "overload"
    summary: str = "two tenants (3:1), interactive (30%) and sheddable batch (70%) at 1.5-2x capacity"

    def sizing(self, replicas: int) -> SimSizing:
        return SimSizing(replicas=replicas, kv_cache_blocks=27000, max_num_seqs=OVERLOAD_SEQS)

    def request(self, index: int, at: float, rng: random.Random, seed: int) -> PlannedRequest:
        tenant = "tenant-a" if rng.random() < self.tenant_a_share else "tenant-b"
        cls = "interactive" if rng.random() < self.interactive_share else "batch"
        out = self.interactive_output if cls == "interactive" else self.batch_output
        prompt = f"{index} " + words(random.Random(f"{seed}:overload:{index}"), self.prompt_len)
        headers = (("x-llm-d-inference-fairness-id", tenant), ("x-llm-d-inference-objective", cls))
        return PlannedRequest(
            index,
            at,
            "/v1/completions",
            completion_body(MODEL, prompt, out),
            MODEL,
            out,
            f"{tenant}/{cls}",
            self.prompt_len,
            headers,
        )

    def parameters(self) -> dict[str, object]:
        return {
            "prompt_len": self.prompt_len,
            "interactive_output": self.interactive_output,
            "batch_output": self.batch_output,
            "interactive_share": self.interactive_share,
            "tenant_a_share": self.tenant_a_share,
            "max_num_seqs": OVERLOAD_SEQS,
        }


WORKLOADS: dict[str, Callable[[], Workload]] = {
    "shared-prefix": SharedPrefix,
    "multi-lora": MultiLora,
    "long-prompt": LongPrompt,
    "bursty": Bursty,
    "overload": Overload,
    "kv-pressure": KVPressure,
}


def get_workload(name: str, quick: bool = False) -> Workload:
    """A workload by name; ``quick`` shrinks it for smoke tests (same shape, smaller sizes)."""
    factory = WORKLOADS.get(name)
    if factory is None:
        raise KeyError(f"unknown workload {name!r}; known: {', '.join(sorted(WORKLOADS))}")
    workload = factory()
    if quick:
        _shrink(workload)
    return workload


def _shrink(workload: Workload) -> None:
    if isinstance(workload, SharedPrefix):
        workload.groups, workload.users_per_group = 4, 4
        workload.system_prompt_len, workload.question_len, workload.output_len = 512, 16, 8
    elif isinstance(workload, MultiLora):
        workload.adapters, workload.prompt_len, workload.output_len = 6, 64, 8
    elif isinstance(workload, LongPrompt):
        workload.documents, workload.output_len = 2, 8
    elif isinstance(workload, Overload):
        workload.prompt_len, workload.batch_output = 64, 32


def names() -> Sequence[str]:
    return tuple(WORKLOADS)
