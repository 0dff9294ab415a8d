"""``static-usage-limit-policy`` (injected by default): one ceiling, ``threshold`` in (0, 1], for every band.
With the default 1.0, a band dispatches while the pool's saturation is below 1.0."""

from __future__ import annotations

from collections.abc import Sequence

TYPE = "static-usage-limit-policy"


class StaticUsageLimit:
    type_name = TYPE

    def __init__(self, threshold: float = 1.0, name: str = TYPE) -> None:
        self.name = name
        self.threshold = threshold

    def ceilings(self, priorities: Sequence[int], saturation: float) -> list[float]:
        return [self.threshold] * len(priorities)
