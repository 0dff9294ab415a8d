"""``max-score-picker``: the highest total score wins; ties are broken at random.

Returns the best ``maxNumOfEndpoints`` candidates in descending score order (the rest are fallbacks), after a
random shuffle so equal scores come out in random order (GIE: shuffle, then stable sort).
Parameters: ``maxNumOfEndpoints`` (default 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from inferoute.epp.plugin import Params, PluginDeps
from inferoute.epp.scheduling.plugins._picker import BoundedPicker, max_endpoints
from inferoute.epp.scheduling.types import Candidate, CycleContext

TYPE = "max-score-picker"
ROLE = "picker"


class MaxScorePicker(BoundedPicker):
    type_name: ClassVar[str] = TYPE

    def pick(
        self, ctx: CycleContext, candidates: Sequence[Candidate], scores: Sequence[float]
    ) -> list[Candidate]:
        if not candidates:
            return []
        if self.max_endpoints == 1:  # fast path: C-level passes, random tie-break only when there is a tie
            best = max(scores)
            if scores.count(best) == 1:
                return [candidates[scores.index(best)]]
            ties = [i for i, s in enumerate(scores) if s == best]
            return [candidates[ctx.rng.choice(ties)]]
        order = list(range(len(candidates)))
        ctx.rng.shuffle(order)
        order.sort(key=lambda i: scores[i], reverse=True)  # stable: ties keep their random order
        return [candidates[i] for i in order[: self.max_endpoints]]


def create(name: str, params: Params, deps: PluginDeps) -> MaxScorePicker:
    return MaxScorePicker(name, max_endpoints(params))
