"""``priority-holdback-policy``: linear ceilings from ``maxCeiling`` (the highest priority band) down to
``minCeiling`` (the lowest), so low priorities stop dispatching first as the pool fills and leave headroom
for the important traffic.

``domain: rank`` spaces the bands evenly by their rank; ``domain: value`` by their priority values. One band
gets ``maxCeiling``. Parameters: ``shape`` linear, ``domain`` rank|value, ``minCeiling`` (required),
``maxCeiling`` 1.0.
"""

from __future__ import annotations

from collections.abc import Sequence

TYPE = "priority-holdback-policy"


class PriorityHoldback:
    type_name = TYPE

    def __init__(
        self, min_ceiling: float, max_ceiling: float = 1.0, domain: str = "rank", name: str = TYPE
    ) -> None:
        if not 0 < min_ceiling <= max_ceiling <= 1:
            raise ValueError("need 0 < minCeiling <= maxCeiling <= 1")
        self.name = name
        self.min_ceiling = min_ceiling
        self.max_ceiling = max_ceiling
        self.domain = domain

    def ceilings(self, priorities: Sequence[int], saturation: float) -> list[float]:
        """``priorities`` in descending order."""
        n = len(priorities)
        lo, hi = self.min_ceiling, self.max_ceiling
        if n <= 1:
            return [hi] * n
        if self.domain == "value":
            top, bottom = priorities[0], priorities[-1]
            span = top - bottom
            return [hi if span == 0 else lo + (hi - lo) * (p - bottom) / span for p in priorities]
        return [hi - (hi - lo) * i / (n - 1) for i in range(n)]
