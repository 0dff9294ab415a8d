"""``running-requests-size-scorer``: prefer endpoints running fewer requests.

Formula: ``(max_r - r) / (max_r - min_r)``, 1.0 for all when equal (GIE). Input: scraped
``TotalRunningRequests``. Parameters: none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from inferoute.epp.plugin import Params, PluginDeps
from inferoute.epp.scheduling.plugins._minmax import lower_is_better
from inferoute.epp.scheduling.types import Candidate, CycleContext

TYPE = "running-requests-size-scorer"
ROLE = "scorer"


class RunningRequestsScorer:
    type_name: ClassVar[str] = TYPE

    def __init__(self, name: str) -> None:
        self.name = name

    def score(self, ctx: CycleContext, candidates: Sequence[Candidate]) -> list[float]:
        return lower_is_better([c.metrics.running for c in candidates])


def create(name: str, params: Params, deps: PluginDeps) -> RunningRequestsScorer:
    return RunningRequestsScorer(name)
