"""``weighted-random-picker``: random choice with probability proportional to the total score.

Weighted sampling without replacement by A-Res (Efraimidis-Spirakis, as GIE): key ``u^(1/score)`` for
``u ~ U(0,1)``, highest keys win. Candidates with score 0 only come after every positive one (in random
order); when every score is 0 the choice is uniform. Parameters: ``maxNumOfEndpoints`` (default 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from inferoute.epp.plugin import Params, PluginDeps
from inferoute.epp.scheduling.plugins._picker import BoundedPicker, max_endpoints
from inferoute.epp.scheduling.types import Candidate, CycleContext

TYPE = "weighted-random-picker"
ROLE = "picker"


class WeightedRandomPicker(BoundedPicker):
    type_name: ClassVar[str] = TYPE

    def pick(
        self, ctx: CycleContext, candidates: Sequence[Candidate], scores: Sequence[float]
    ) -> list[Candidate]:
        rand = ctx.rng.random
        keyed: list[tuple[float, float, Candidate]] = []
        for c, score in zip(candidates, scores, strict=True):
            u = rand()
            if score > 0:
                keyed.append((1.0, u ** (1.0 / score), c))
            else:
                keyed.append((0.0, u, c))
        keyed.sort(key=lambda t: (t[0], t[1]), reverse=True)
        return [c for _, _, c in keyed[: self.max_endpoints]]


def create(name: str, params: Params, deps: PluginDeps) -> WeightedRandomPicker:
    return WeightedRandomPicker(name, max_endpoints(params))
