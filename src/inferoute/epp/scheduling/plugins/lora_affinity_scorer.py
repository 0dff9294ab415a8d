"""``lora-affinity-scorer``: prefer endpoints that already have the requested LoRA adapter.

Formula (GIE): 1.0 when the adapter is running on the endpoint; 0.8 when it is not but the endpoint has room
(``active + waiting < max_lora``); 0.6 when it is waiting to load; else 0.
Input: ``vllm:lora_requests_info`` labels (running/waiting adapters, ``max_lora``) and the request's target
model. A request for a base model (no server reports it as an adapter anywhere) scores 1.0 everywhere, so the
scorer does not disturb non-LoRA traffic. Parameters: none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from inferoute.epp.plugin import Params, PluginDeps
from inferoute.epp.scheduling.types import Candidate, CycleContext

TYPE = "lora-affinity-scorer"
ROLE = "scorer"


class LoraAffinityScorer:
    type_name: ClassVar[str] = TYPE

    def __init__(self, name: str) -> None:
        self.name = name

    def score(self, ctx: CycleContext, candidates: Sequence[Candidate]) -> list[float]:
        model = ctx.request.target_model
        for c in candidates:  # a loop, not any(generator): this runs for every request, LoRA or not
            if c.metrics.max_lora:
                break
        else:
            return [1.0] * len(candidates)  # no LoRA-capable endpoint reports adapters
        out: list[float] = []
        for c in candidates:
            m = c.metrics
            if model in m.active_adapters:
                out.append(1.0)
            elif len(m.active_adapters) + len(m.waiting_adapters) < m.max_lora:
                out.append(0.8)
            elif model in m.waiting_adapters:
                out.append(0.6)
            else:
                out.append(0.0)
        return out


def create(name: str, params: Params, deps: PluginDeps) -> LoraAffinityScorer:
    return LoraAffinityScorer(name)
