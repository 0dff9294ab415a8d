"""Flow-control outcomes → HTTP, in one place (the reference's ``translateFlowControlOutcome``).

==============================================  ======  ===================================
outcome                                         status  ``x-llm-d-request-dropped-reason``
==============================================  ======  ===================================
RejectedCapacity                                429     ``rejected-saturated``
RejectedNoEndpoints (capacity hit, empty pool)  503     ``rejected-no-endpoints``
EvictedTTL, pool has endpoints                  429     ``rejected-ttl-expired``
EvictedTTL with the pool empty /                503     ``rejected-no-endpoints``
EvictedNoEndpoints
EvictedContextCancelled (client gone)           503     ``rejected-context-cancelled``
RejectedOther / EvictedOther (shutting down)    503     ``rejected-shutting-down``
==============================================  ======  ===================================

429 means "capacity exists but is busy: retry later"; 503 means "no serving capacity exists".
"""

from __future__ import annotations

from dataclasses import dataclass

from inferoute.epp.flowcontrol.types import Outcome


@dataclass(frozen=True, slots=True)
class Drop:
    status: int
    reason: str
    message: str
    cause: str


def translate(outcome: Outcome, *, pool_empty: bool = False) -> Drop:
    """The status, drop reason and message for a request flow control did not dispatch."""
    if outcome is Outcome.REJECTED_CAPACITY:
        return Drop(
            429, "rejected-saturated", "request rejected: the flow-control queue is full", "fc-saturated"
        )
    if outcome is Outcome.EVICTED_TTL and not pool_empty:
        return Drop(
            429, "rejected-ttl-expired", "request timed out in queue: the pool stayed saturated", "fc-ttl"
        )
    if outcome in (Outcome.REJECTED_NO_ENDPOINTS, Outcome.EVICTED_NO_ENDPOINTS, Outcome.EVICTED_TTL):
        return Drop(
            503, "rejected-no-endpoints", "no endpoints available to serve the request", "fc-no-endpoints"
        )
    if outcome is Outcome.EVICTED_CONTEXT_CANCELLED:
        return Drop(503, "rejected-context-cancelled", "client disconnected", "fc-cancelled")
    if outcome in (Outcome.REJECTED_OTHER, Outcome.EVICTED_OTHER):
        return Drop(503, "rejected-shutting-down", "the endpoint picker is shutting down", "fc-shutdown")
    return Drop(500, "", f"unexpected flow-control outcome {outcome.value}", "fc-internal")
