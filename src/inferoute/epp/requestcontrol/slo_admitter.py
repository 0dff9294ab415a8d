"""``latency-slo-admitter``: shed a sheddable request that no endpoint can serve within its TTFT objective.

The reference's admitter: a request with priority < 0 and a TTFT objective (``x-llm-d-slo-ttft-ms``) is
admitted only when some candidate endpoint is

* **valid** -- its predicted TTFT (the ``predicted-ttft-scorer`` model, same parameters) is within the SLO;
* **idle** -- nothing running, waiting or in flight from this picker; or
* **cold** -- KV-cache use under 2% (a fresh replica the predictor knows nothing about).

Otherwise it is refused with 429 before it takes a slot from work that can still meet its objective.
Requests without an SLO, or not sheddable, always pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from inferoute.epp.plugin import Params, PluginDeps
from inferoute.epp.scheduling.plugins.predicted_ttft_scorer import PredictedTTFTScorer, model_params
from inferoute.epp.scheduling.types import Candidate, CycleContext

TYPE = "latency-slo-admitter"
COLD_KV = 0.02


class LatencySloAdmitter:
    type_name: ClassVar[str] = TYPE

    def __init__(self, name: str, predictor: PredictedTTFTScorer) -> None:
        self.name = name
        self.predictor = predictor

    def refuse(self, ctx: CycleContext, candidates: Sequence[Candidate]) -> str | None:
        """Why the request is refused, or None to admit it."""
        req = ctx.request
        slo = req.slo_ttft
        if slo is None or req.priority >= 0 or not candidates:
            return None
        for c in candidates:
            m = c.metrics
            if m.kv_usage < COLD_KV or (m.running == 0 and m.waiting == 0 and c.inflight.requests == 0):
                return None
        predicted = self.predictor.predict(ctx, candidates)
        best = min(predicted)
        if best <= slo:
            return None
        return (
            f"request shed: no endpoint can meet its TTFT objective of {slo * 1000:g} ms "
            f"(best predicted {best * 1000:.0f} ms) and it is sheddable (priority {req.priority})"
        )


def create(name: str, params: Params, deps: PluginDeps) -> LatencySloAdmitter:
    return LatencySloAdmitter(name, PredictedTTFTScorer(name, model_params(params)))
