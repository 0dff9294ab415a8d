"""The disaggregation decision counter, with the reference's names (llm-d-router's ``disagg`` package).

Every request the ``disagg-profile-handler`` schedules counts once, by the stages it was sent through:

* ``llm_d_epp_disagg_decision_total{plugin_name, plugin_type, model_name, decision_type}``;
* the deprecated twin ``llm_d_inference_scheduler_disagg_decision_total{model_name, decision_type}``, emitted
  too, as the reference does.

``decision_type`` is ``decode-only``, ``prefill-decode``, ``encode-decode`` or ``encode-prefill-decode``;
``model_name`` is the target model (after rewrites; ``unknown`` when empty). Model names are client-chosen, so
the label takes the first :data:`MAX_MODELS` distinct names (each at most
:data:`~inferoute.epp.metrics.MAX_LABEL_CHARS` long) and ``other`` after that. The counters are plain numbers
(:mod:`inferoute.fastmetrics`): one ``+=`` per request.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry

from inferoute.epp.metrics import MAX_LABEL_CHARS, OTHER
from inferoute.epp.scheduling.framework import Scheduler
from inferoute.epp.scheduling.handlers import DisaggProfileHandler
from inferoute.fastmetrics import DescribedFastCollector, FastFamily, FastValue

MAX_MODELS = 100
NAME = "llm_d_epp_disagg_decision"
DEPRECATED_NAME = "llm_d_inference_scheduler_disagg_decision"


class DisaggMetrics:
    """Counts a :class:`DisaggProfileHandler`'s decisions (attach with :meth:`for_scheduler`)."""

    def __init__(self, registry: CollectorRegistry, handler: DisaggProfileHandler) -> None:
        self.registry = registry
        self.handler = handler
        self.family = FastFamily(
            "counter",
            NAME,
            "Total number of disaggregation routing decisions made.",
            ("plugin_name", "plugin_type", "model_name", "decision_type"),
        )
        self.deprecated = FastFamily(
            "counter",
            DEPRECATED_NAME,
            "[Deprecated: Use llm_d_epp_disagg_decision_total] Total number of disaggregation routing "
            "decisions made.",
            ("model_name", "decision_type"),
        )
        self._collector = DescribedFastCollector([self.family, self.deprecated])
        registry.register(self._collector)
        self._children: dict[tuple[str, str], tuple[FastValue, FastValue]] = {}
        self._models: set[str] = set()
        handler.report = self.report

    @classmethod
    def for_scheduler(cls, scheduler: Scheduler, registry: CollectorRegistry) -> DisaggMetrics | None:
        """The counter for the scheduler's disagg handler, or None when it has none."""
        handler = scheduler.handler
        if not isinstance(handler, DisaggProfileHandler):
            return None
        return cls(registry, handler)

    def report(self, model: str, decision: str) -> None:
        children = self._children.get((model, decision))
        if children is None:
            children = self._resolve(model, decision)
        children[0].inc()
        children[1].inc()

    def _resolve(self, model: str, decision: str) -> tuple[FastValue, FastValue]:
        label = model or "unknown"
        if label not in self._models:
            if len(self._models) >= MAX_MODELS or len(label) > MAX_LABEL_CHARS:
                label = OTHER
            else:
                self._models.add(label)
        h = self.handler
        children = (
            self.family.value(h.name, h.configured_type, label, decision),
            self.deprecated.value(label, decision),
        )
        if label != OTHER or model == OTHER:  # an overflowing name is not remembered
            self._children[(model, decision)] = children
        return children

    def close(self) -> None:
        self.handler.report = None
        with contextlib.suppress(KeyError):
            self.registry.unregister(self._collector)
