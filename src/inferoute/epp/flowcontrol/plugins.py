"""Flow-control config plugins.

* ``utilization-detector``: ``queueDepthThreshold`` (5), ``kvCacheUtilThreshold`` (0.8), ``headroom`` (0);
  the detector itself is :class:`inferoute.epp.flowcontrol.UtilizationDetector`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from inferoute.epp.plugin import Factory, Params, PluginDeps


@dataclass(slots=True)
class UtilizationDetectorConfig:
    type_name: ClassVar[str] = "utilization-detector"
    name: str
    queue_depth_threshold: float = 5
    kv_cache_util_threshold: float = 0.8
    headroom: float = 0.0


def _detector(name: str, p: Params, deps: PluginDeps) -> UtilizationDetectorConfig:
    return UtilizationDetectorConfig(
        name,
        p.number("queueDepthThreshold", 5, minimum=0),
        p.number("kvCacheUtilThreshold", 0.8, minimum=0, maximum=1),
        p.number("headroom", 0.0, minimum=0),
    )


FACTORIES: dict[str, Factory] = {"utilization-detector": _detector}
