"""``soft-reflective-ceiling-policy``: ceilings that reflect the current saturation,
``ceiling[i] = 1 - i*sat/(N-1)`` (band 0 = highest priority keeps 1.0).

A lower band whose ceiling the saturation reaches is not shut hard: it alternates, closed for
``round(sat/(1-sat))`` evaluations and then open for one, so it trickles instead of starving (the reference's
"alternates open/closed with period round(sat/(1-sat))"). At saturation ≥ 1 every band is closed. No
parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

TYPE = "soft-reflective-ceiling-policy"


class SoftReflectiveCeiling:
    type_name = TYPE

    def __init__(self, name: str = TYPE) -> None:
        self.name = name
        self._ticks = 0

    def ceilings(self, priorities: Sequence[int], saturation: float) -> list[float]:
        n = len(priorities)
        if n <= 1:
            return [1.0] * n
        sat = max(0.0, saturation)
        out = [1.0 - i * sat / (n - 1) for i in range(n)]
        if 0 < sat < 1:
            self._ticks += 1
            period = max(1, round(sat / (1 - sat)))
            if self._ticks % (period + 1) == 0:  # the open beat: lift reached ceilings just above sat
                out = [c if c > sat else min(1.0, sat + 1e-9) for c in out]
        return out
