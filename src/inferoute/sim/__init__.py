"""A vLLM-compatible model-server simulator: the test and benchmark backend of inferoute.

Theory of operation
-------------------
* :mod:`~inferoute.sim.engine` is a pure discrete-event model of one vLLM engine: continuous batching with a
  FIFO waiting queue, iteration-level (step) latency, a paged KV cache with automatic prefix caching
  (:mod:`~inferoute.sim.kvcache`) and LoRA slots. It never reads a clock: callers pass ``now``.
* :mod:`~inferoute.sim.server` wraps each engine in an aiohttp server (one *replica*) with one timer armed at
  the engine's next event; handlers stream the tokens the engine produced, in vLLM's SSE format
  (:mod:`~inferoute.sim.protocol`), and ``/metrics`` exposes vLLM's metric names
  (:mod:`~inferoute.sim.metrics`).
* :class:`SimPool` runs N independent replicas in one process; ``inferoute sim`` is its command line.
* :mod:`~inferoute.sim.tokenizer` is a deterministic tokenizer approximation others may reuse to count tokens.

Usage::

    from inferoute.sim import SimConfig, SimPool
    async with await SimPool.start(SimConfig(time_scale=0.1), replicas=4) as pool:
        pool.endpoints   # [Endpoint("sim-0", "127.0.0.1", port), ...]
"""

from inferoute.sim.config import DEFAULT_MODEL, SimConfig
from inferoute.sim.server import FORCE_STATUS_HEADER, POD_HEADER, PORT_HEADER, Replica, SimPool

__all__ = [
    "DEFAULT_MODEL",
    "FORCE_STATUS_HEADER",
    "POD_HEADER",
    "PORT_HEADER",
    "Replica",
    "SimConfig",
    "SimPool",
]
