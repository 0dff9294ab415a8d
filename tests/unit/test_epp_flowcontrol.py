"""The saturation detector behind admission (GIE's utilization-detector)."""

from __future__ import annotations

from inferoute.epp.datalayer.metrics import EndpointMetrics
from inferoute.epp.flowcontrol import UtilizationDetector


def test_saturation_is_the_fraction_of_endpoints_without_capacity() -> None:
    d = UtilizationDetector(queue_depth_threshold=5, kv_cache_util_threshold=0.8)
    idle = EndpointMetrics(waiting=0, kv_usage=0.1)
    queued = EndpointMetrics(waiting=5, kv_usage=0.1)
    full_kv = EndpointMetrics(waiting=0, kv_usage=0.85)
    assert d.saturation([idle, idle]) == 0.0
    assert d.saturation([idle, queued]) == 0.5
    assert d.saturation([queued, full_kv]) == 1.0
    assert d.saturation([]) == 1.0  # no endpoint has capacity


def test_headroom_lowers_the_thresholds() -> None:
    m = EndpointMetrics(waiting=4, kv_usage=0.1)
    assert UtilizationDetector(5, 0.8).saturation([m]) == 0.0
    assert UtilizationDetector(5, 0.8, headroom=0.2).saturation([m]) == 1.0
