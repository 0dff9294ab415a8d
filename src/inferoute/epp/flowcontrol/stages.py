"""Stage-aware saturation: prefill and decode endpoints are measured apart, and the pool gates on the worse.

As the reference's processor does: the prefill stage is the endpoints that serve prefill, the decode stage
those that serve decode, read from the ``llm-d.ai/role`` label the way the role filters read it
(:func:`~inferoute.epp.scheduling.handlers.role_stages`: unlabelled endpoints decode, ``prefill-decode`` and
``encode-prefill-decode`` count in both stages, ``encode-decode`` in decode). Encode-only endpoints are in
neither: the picker never counts load on them, so they would only dilute the decode stage's signal. The
effective saturation is max(prefill, decode) over the stages that have endpoints, so a disaggregated pool
whose prefill servers are full is saturated even while its decoders idle. A pool without prefill endpoints
reads its decode stage; a pool with neither stage (only encoders) is measured whole.
"""

from __future__ import annotations

from collections.abc import Sequence

from inferoute.epp.flowcontrol.types import SaturationDetector
from inferoute.epp.scheduling.handlers import ROLE_LABEL, role_stages
from inferoute.epp.scheduling.types import Candidate

__all__ = ["ROLE_LABEL", "stage_saturation"]


def stage_saturation(detector: SaturationDetector, pool: Sequence[Candidate], now: float) -> dict[str, float]:
    """``{"effective": ..., "decode": ..., "prefill": ...}`` (a stage without endpoints is left out)."""
    if not any(c.labels for c in pool):  # the common case: no roles at all, one decode stage
        sat = detector.saturation(pool, now)
        return {"effective": sat, "decode": sat}
    stages = [role_stages(c) for c in pool]
    prefill = [c for c, s in zip(pool, stages, strict=True) if "prefill" in s]
    decode = [c for c, s in zip(pool, stages, strict=True) if "decode" in s]
    out: dict[str, float] = {}
    if prefill:
        out["prefill"] = detector.saturation(prefill, now)
    if decode:
        out["decode"] = detector.saturation(decode, now)
    out["effective"] = max(out.values()) if out else detector.saturation(pool, now)
    return out
