"""Stage-aware saturation: prefill and decode endpoints are measured apart, and the pool gates on the worse.

As the reference's processor does: endpoints labelled ``llm-d.ai/role: prefill`` form the prefill stage,
every other endpoint (``decode``, ``both`` or unlabelled) the decode stage; the effective saturation is
max(prefill, decode) over the stages that have endpoints, so a disaggregated pool whose prefill servers are
full is saturated even while its decoders idle. A pool without prefill endpoints reads as before.
"""

from __future__ import annotations

from collections.abc import Sequence

from inferoute.epp.flowcontrol.types import SaturationDetector
from inferoute.epp.scheduling.types import Candidate

ROLE_LABEL = "llm-d.ai/role"


def stage_saturation(detector: SaturationDetector, pool: Sequence[Candidate], now: float) -> dict[str, float]:
    """``{"effective": ..., "decode": ..., "prefill": ...}`` (a stage without endpoints is left out)."""
    prefill = [c for c in pool if c.labels.get(ROLE_LABEL) == "prefill"]
    if not prefill:
        sat = detector.saturation(pool, now)
        return {"effective": sat, "decode": sat}
    decode = [c for c in pool if c.labels.get(ROLE_LABEL) != "prefill"]
    out = {"prefill": detector.saturation(prefill, now)}
    if decode:
        out["decode"] = detector.saturation(decode, now)
    out["effective"] = max(out.values())
    return out
