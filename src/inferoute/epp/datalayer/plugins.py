"""Data-layer config plugins: they carry the scrape settings of GIE ``EndpointPickerConfig`` files.

* ``metrics-data-source``: ``scheme`` (http|https), ``path`` (/metrics), ``insecureSkipVerify``.
* ``core-metrics-extractor``: ``defaultEngine`` (vllm|sglang|trtllm-serve|triton-trtllm).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from inferoute.epp.datalayer.metrics import ENGINES
from inferoute.epp.plugin import Factory, Params, PluginDeps, config_error


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


def _data_source(name: str, p: Params, deps: PluginDeps) -> MetricsDataSource:
    scheme, path = p.text("scheme", "http", choices=("http", "https")), p.text("path", "/metrics")
    if not path.startswith("/"):
        raise config_error(f"{p.where}.path: must start with '/', got {path!r}")
    return MetricsDataSource(name, scheme, path, p.flag("insecureSkipVerify", True))


def _extractor(name: str, p: Params, deps: PluginDeps) -> CoreMetricsExtractor:
    return CoreMetricsExtractor(name, p.text("defaultEngine", "vllm", choices=tuple(sorted(ENGINES))))


FACTORIES: dict[str, Factory] = {
    "metrics-data-source": _data_source,
    "core-metrics-extractor": _extractor,
}
