"""Config plugins with no scheduling role: they carry parameters for the data layer, the prefix producer,
the profile handler, the parser and the saturation detector, so GIE ``EndpointPickerConfig`` files load as is.

* ``metrics-data-source``: ``scheme`` (http|https), ``path`` (/metrics), ``insecureSkipVerify``.
* ``core-metrics-extractor``: ``defaultEngine`` (vllm|sglang|trtllm-serve|triton-trtllm).
* ``approx-prefix-cache-producer``: ``autoTune``, ``blockSizeTokens``, ``maxPrefixBlocksToMatch``,
  ``maxPrefixTokensToMatch``, ``lruCapacityPerServer``.
* ``utilization-detector``: ``queueDepthThreshold`` (5), ``kvCacheUtilThreshold`` (0.8), ``headroom`` (0).
* ``single-profile-handler``, ``openai-parser``: no parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from inferoute.epp.datalayer.metrics import ENGINES
from inferoute.epp.scheduling.plugins.prefix_cache_scorer import read_prefix_settings
from inferoute.epp.scheduling.registry import Factory, Params, PluginDeps
from inferoute.epp.scheduling.types import PrefixSettings


@dataclass(slots=True)
class MetricsDataSource:
    type_name: ClassVar[str] = "metrics-data-source"
    name: str
    scheme: str = "http"
    path: str = "/metrics"
    insecure_skip_verify: bool = True


@dataclass(slots=True)
class CoreMetricsExtractor:
    type_name: ClassVar[str] = "core-metrics-extractor"
    name: str
    default_engine: str = "vllm"


@dataclass(slots=True)
class PrefixProducer:
    type_name: ClassVar[str] = "approx-prefix-cache-producer"
    name: str
    settings: PrefixSettings


@dataclass(slots=True)
class UtilizationDetector:
    """Saturation = max over endpoints... see :mod:`inferoute.epp.flowcontrol`."""

    type_name: ClassVar[str] = "utilization-detector"
    name: str
    queue_depth_threshold: float = 5
    kv_cache_util_threshold: float = 0.8
    headroom: float = 0.0


@dataclass(slots=True)
class NoParams:
    type_name: ClassVar[str] = "other"
    name: str
    kind: str = ""


def _data_source(name: str, p: Params, deps: PluginDeps) -> MetricsDataSource:
    return MetricsDataSource(
        name,
        p.text("scheme", "http", choices=("http", "https")),
        p.text("path", "/metrics"),
        p.flag("insecureSkipVerify", True),
    )


def _extractor(name: str, p: Params, deps: PluginDeps) -> CoreMetricsExtractor:
    return CoreMetricsExtractor(name, p.text("defaultEngine", "vllm", choices=tuple(sorted(ENGINES))))


def _producer(name: str, p: Params, deps: PluginDeps) -> PrefixProducer:
    return PrefixProducer(name, read_prefix_settings(p) or PrefixSettings())


def _detector(name: str, p: Params, deps: PluginDeps) -> UtilizationDetector:
    return UtilizationDetector(
        name,
        p.number("queueDepthThreshold", 5, minimum=0),
        p.number("kvCacheUtilThreshold", 0.8, minimum=0, maximum=1),
        p.number("headroom", 0.0, minimum=0),
    )


def _no_params(kind: str) -> Factory:
    def create(name: str, p: Params, deps: PluginDeps) -> NoParams:
        return NoParams(name, kind)

    return create


FACTORIES: dict[str, Factory] = {
    "metrics-data-source": _data_source,
    "core-metrics-extractor": _extractor,
    "approx-prefix-cache-producer": _producer,
    "utilization-detector": _detector,
    "single-profile-handler": _no_params("single-profile-handler"),
    "openai-parser": _no_params("openai-parser"),
}
