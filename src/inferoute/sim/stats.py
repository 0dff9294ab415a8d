"""Counters and histograms the engine keeps, exported by :mod:`inferoute.sim.metrics` under vLLM's names.

Plain objects (no prometheus_client on the hot path): one histogram observation per engine step covers every
sequence in the batch (``observe(value, n)``), so metrics cost O(steps), not O(tokens).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field

# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
# vLLM uses the same boundaries for time per output token as for inter-token latency.
TPOT_BUCKETS = ITL_BUCKETS
TOKEN_COUNT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
REQUEST_LATENCY_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)


class Histogram:
    """A fixed-bucket histogram (non-cumulative counts; the last slot is +Inf)."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, n: int = 1) -> None:
        """Record ``n`` observations of ``value``."""
        self.counts[bisect_left(self.bounds, value)] += n
        self.sum += value * n
        self.count += n

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, cumulative count)`` pairs ending with ``+Inf``, as Prometheus wants them."""
        out: list[tuple[str, int]] = []
        acc = 0
        for bound, c in zip((*(repr(float(b)) for b in self.bounds), "+Inf"), self.counts, strict=True):
            acc += c
            out.append((bound, acc))
        return out


@dataclass(slots=True)
class EngineStats:
    """Monotonic counters and latency histograms of one engine (seconds are wall seconds, i.e. scaled)."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_queries: int = 0
    """Prompt tokens looked up in the prefix cache (counted at admission)."""
    prefix_hits: int = 0
    """Prompt tokens found in the prefix cache."""
    success: dict[str, int] = field(default_factory=dict)
    """Finished requests by ``finished_reason`` (stop, length, abort)."""
    rejected_queue_full: int = 0
    preemptions: int = 0
    """Running requests sent back to the queue because the KV cache ran out (recompute preemption)."""
    lora_loads: int = 0
    """Adapters loaded into a slot."""
    lora_slot_waits: int = 0
    """Requests that had to wait because no adapter slot was free (each counted once)."""
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    itl: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS))
    queue: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS))
    prefill: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS))
    """Admission to first token."""
    decode: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS))
    """First token to the last."""
    inference: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS))
    """Admission to the last token."""
    tpot: Histogram = field(default_factory=lambda: Histogram(TPOT_BUCKETS))
    """Mean time per output token after the first, per request."""
    prompt_len: Histogram = field(default_factory=lambda: Histogram(TOKEN_COUNT_BUCKETS))
    generation_len: Histogram = field(default_factory=lambda: Histogram(TOKEN_COUNT_BUCKETS))
    max_tokens_param: Histogram = field(default_factory=lambda: Histogram(TOKEN_COUNT_BUCKETS))
