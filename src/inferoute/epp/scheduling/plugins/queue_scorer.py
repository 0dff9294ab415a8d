"""``queue-scorer``: prefer endpoints with fewer queued requests.

Formula: ``(max_q - q) / (max_q - min_q)`` over the candidates, 1.0 for all when every queue is equal (GIE).
Input: ``q = waiting`` (scraped ``TotalQueuedRequests``) plus, when ``countInflight`` is on, the requests this
picker sent that have not started answering yet and are newer than the scrape (max of the two, so a request is
not counted twice once the scrape sees it).
Parameters: ``countInflight`` (bool, default true; false gives GIE's exact behaviour).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from inferoute.epp.plugin import Params, PluginDeps
from inferoute.epp.scheduling.plugins._minmax import lower_is_better
from inferoute.epp.scheduling.types import Candidate, CycleContext

TYPE = "queue-scorer"
ROLE = "scorer"


class QueueScorer:
    type_name: ClassVar[str] = TYPE

    def __init__(self, name: str, count_inflight: bool = True) -> None:
        self.name = name
        self.count_inflight = count_inflight

    def score(self, ctx: CycleContext, candidates: Sequence[Candidate]) -> list[float]:
        if not self.count_inflight:
            return lower_is_better([c.metrics.waiting for c in candidates])
        queues: list[float] = []
        append = queues.append
        for c in candidates:  # max(waiting, pending) without a call to max() per candidate
            waiting = c.metrics.waiting
            pending = c.inflight.pending
            append(pending if pending > waiting else waiting)
        return lower_is_better(queues)


def create(name: str, params: Params, deps: PluginDeps) -> QueueScorer:
    return QueueScorer(name, params.flag("countInflight", True))
