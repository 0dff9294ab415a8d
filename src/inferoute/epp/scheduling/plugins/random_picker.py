"""``random-picker``: a uniformly random candidate, ignoring scores.

Returns ``maxNumOfEndpoints`` distinct candidates in random order. Parameters: ``maxNumOfEndpoints``
(default 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from inferoute.epp.plugin import Params, PluginDeps
from inferoute.epp.scheduling.plugins._picker import BoundedPicker, max_endpoints
from inferoute.epp.scheduling.types import Candidate, CycleContext

TYPE = "random-picker"
ROLE = "picker"


class RandomPicker(BoundedPicker):
    type_name: ClassVar[str] = TYPE

    def pick(
        self, ctx: CycleContext, candidates: Sequence[Candidate], scores: Sequence[float]
    ) -> list[Candidate]:
        k = min(self.max_endpoints, len(candidates))
        return ctx.rng.sample(list(candidates), k)


def create(name: str, params: Params, deps: PluginDeps) -> RandomPicker:
    return RandomPicker(name, max_endpoints(params))
