"""``concurrency-detector``: saturation from the picker's own in-flight counts (no scrape lag).

* ``requests`` mode: saturation = Σ in-flight requests / (endpoints x ``maxConcurrency``);
* ``tokens`` mode: Σ in-flight prompt tokens / (endpoints x ``maxTokenConcurrency``);
* ``hybrid``: each endpoint's max of the two ratios, then the mean.

The counts are the ones the picker itself raised when it picked and lowers when the response ends, so a
dispatch is visible to the next dispatch decision at once — what lets flow control hold work in its own queue
instead of the model servers'. ``headroom`` widens the per-endpoint capacity (capacity x (1 + headroom)).
An empty pool reads 1.0. Parameters: ``concurrencyMode`` requests, ``maxConcurrency`` 100,
``maxTokenConcurrency`` 1,000,000, ``headroom`` 0.
"""

from __future__ import annotations

from collections.abc import Sequence

from inferoute.epp.scheduling.types import Candidate

TYPE = "concurrency-detector"
MODES = ("requests", "tokens", "hybrid")


class ConcurrencyDetector:
    type_name = TYPE

    def __init__(
        self,
        mode: str = "requests",
        max_concurrency: int = 100,
        max_token_concurrency: int = 1_000_000,
        headroom: float = 0.0,
        name: str = TYPE,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"concurrencyMode {mode!r}; valid: {', '.join(MODES)}")
        self.name = name
        self.mode = mode
        self.max_requests = max(max_concurrency * (1 + headroom), 1e-9)
        self.max_tokens = max(max_token_concurrency * (1 + headroom), 1e-9)
        self.stale_endpoints = 0

    def saturation(self, endpoints: Sequence[Candidate], now: float) -> float:
        n = len(endpoints)
        if n == 0:
            return 1.0
        if self.mode == "requests":
            return sum(c.inflight.requests for c in endpoints) / (n * self.max_requests)
        if self.mode == "tokens":
            return sum(c.inflight.tokens for c in endpoints) / (n * self.max_tokens)
        total = 0.0
        for c in endpoints:
            r = c.inflight.requests / self.max_requests
            t = c.inflight.tokens / self.max_tokens
            total += r if r > t else t
        return total / n

    def per_endpoint_capacity(self) -> float:
        """Requests one endpoint takes at saturation 1.0 (the replica recommendation uses it)."""
        return self.max_requests
