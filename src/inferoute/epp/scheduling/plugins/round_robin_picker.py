"""``round-robin-picker`` (inferoute baseline): cycle through the candidates, ignoring scores.

Candidates are ordered by key so the cycle is stable while the candidate set is stable; a counter advances on
every pick. Fallbacks are the next endpoints in the cycle. Parameters: ``maxNumOfEndpoints`` (default 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from inferoute.epp.plugin import Params, PluginDeps
from inferoute.epp.scheduling.plugins._picker import BoundedPicker, max_endpoints
from inferoute.epp.scheduling.types import Candidate, CycleContext

TYPE = "round-robin-picker"
ROLE = "picker"


class RoundRobinPicker(BoundedPicker):
    type_name: ClassVar[str] = TYPE

    def __init__(self, name: str, max_endpoints: int = 1) -> None:
        super().__init__(name, max_endpoints)
        self._next = 0

    def pick(
        self, ctx: CycleContext, candidates: Sequence[Candidate], scores: Sequence[float]
    ) -> list[Candidate]:
        if not candidates:
            return []
        ordered = sorted(candidates, key=lambda c: c.key)
        n = len(ordered)
        start = self._next % n
        self._next = start + 1
        return [ordered[(start + i) % n] for i in range(min(self.max_endpoints, n))]


def create(name: str, params: Params, deps: PluginDeps) -> RoundRobinPicker:
    return RoundRobinPicker(name, max_endpoints(params))
