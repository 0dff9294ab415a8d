"""``max-score-picker``: the highest total score wins; ties are broken at random.

Returns the best ``maxNumOfEndpoints`` candidates in descending score order (the rest are fallbacks), after a
random shuffle so equal scores come out in random order (GIE: shuffle, then stable sort).
Parameters: ``maxNumOfEndpoints`` (default 1).
"""

from __future__ import annotations

from typing import ClassVar

from inferoute.epp.scheduling.registry import Params, PluginDeps
from inferoute.epp.scheduling.types import Candidate, CycleContext, Scored

TYPE = "max-score-picker"
ROLE = "picker"


class MaxScorePicker:
    type_name: ClassVar[str] = TYPE

    def __init__(self, name: str, max_endpoints: int = 1) -> None:
        self.name = name
        self.max_endpoints = max_endpoints

    def pick(self, ctx: CycleContext, scored: list[Scored]) -> list[Candidate]:
        if not scored:
            return []
        if self.max_endpoints == 1:  # fast path: one pass, reservoir-style random tie-break
            best = scored[0].score
            chosen = scored[0]
            ties = 1
            rand = ctx.rng.random
            for s in scored[1:]:
                if s.score > best:
                    best, chosen, ties = s.score, s, 1
                elif s.score == best:
                    ties += 1
                    if rand() * ties < 1.0:
                        chosen = s
            return [chosen.candidate]
        shuffled = list(scored)
        ctx.rng.shuffle(shuffled)
        shuffled.sort(key=lambda s: s.score, reverse=True)
        return [s.candidate for s in shuffled[: self.max_endpoints]]


def create(name: str, params: Params, deps: PluginDeps) -> MaxScorePicker:
    return MaxScorePicker(name, params.integer("maxNumOfEndpoints", 1, minimum=1))
