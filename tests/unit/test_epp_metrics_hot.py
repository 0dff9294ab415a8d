"""The picker's metrics release the registry on close (the shared exposition check is in test_fastmetrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from inferoute.epp.metrics import EppMetrics


def test_close_frees_the_registry_for_a_new_picker() -> None:
    registry = CollectorRegistry()
    first = EppMetrics(registry)
    first.series("m", "m").request_total.inc()
    first.close()
    second = EppMetrics(registry)  # would raise "Duplicated timeseries" if anything stayed registered
    assert (
        registry.get_sample_value(
            "inference_objective_request_total", {"model_name": "m", "target_model_name": "m"}
        )
        is None
    )
    second.series("m", "m").request_total.inc()
    assert (
        registry.get_sample_value(
            "inference_objective_request_total", {"model_name": "m", "target_model_name": "m"}
        )
        == 1
    )
