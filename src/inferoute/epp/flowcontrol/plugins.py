"""Flow-control plugin factories under the reference's type names, and the role groups the config resolves.

Fairness: ``global-strict-fairness-policy``, ``round-robin-fairness-policy``, ``program-aware-fairness``.
Ordering: ``fcfs-ordering-policy``, ``edf-ordering-policy``, ``slo-deadline-ordering-policy``.
Saturation: ``utilization-detector``, ``concurrency-detector``. Usage limits: ``static-usage-limit-policy``,
``priority-holdback-policy``, ``soft-reflective-ceiling-policy``. Each module documents its formula and
parameters.
"""

from __future__ import annotations

from inferoute.clock import SystemClock
from inferoute.epp.flowcontrol.concurrency_detector import MODES, ConcurrencyDetector
from inferoute.epp.flowcontrol.edf_ordering import EdfOrdering
from inferoute.epp.flowcontrol.fcfs_ordering import FcfsOrdering
from inferoute.epp.flowcontrol.global_strict_fairness import GlobalStrictFairness
from inferoute.epp.flowcontrol.priority_holdback import PriorityHoldback
from inferoute.epp.flowcontrol.program_aware_fairness import ProgramAwareFairness
from inferoute.epp.flowcontrol.round_robin_fairness import RoundRobinFairness
from inferoute.epp.flowcontrol.slo_deadline_ordering import SloDeadlineOrdering
from inferoute.epp.flowcontrol.soft_reflective_ceiling import SoftReflectiveCeiling
from inferoute.epp.flowcontrol.static_usage_limit import StaticUsageLimit
from inferoute.epp.flowcontrol.units import duration
from inferoute.epp.flowcontrol.utilization_detector import UtilizationDetector
from inferoute.epp.learned import LocalLearnedState
from inferoute.epp.plugin import Factory, Params, PluginDeps, config_error

FAIRNESS = (GlobalStrictFairness, RoundRobinFairness, ProgramAwareFairness)
ORDERING = (FcfsOrdering, EdfOrdering, SloDeadlineOrdering)
DETECTORS = (UtilizationDetector, ConcurrencyDetector)
USAGE_LIMITS = (StaticUsageLimit, PriorityHoldback, SoftReflectiveCeiling)
DEFAULT_FAIRNESS = "global-strict-fairness-policy"
DEFAULT_ORDERING = "fcfs-ordering-policy"
DEFAULT_DETECTOR = "utilization-detector"
DEFAULT_USAGE = "static-usage-limit-policy"


def _utilization(name: str, p: Params, deps: PluginDeps) -> UtilizationDetector:
    key = "metricsStalenessThreshold"
    v = p.raw.get(key)
    if v is None or isinstance(v, str):
        staleness = duration(p.text(key, "200ms"), f"{p.where}.{key}")
    else:
        staleness = p.number(key, 0.2, minimum=0)
    return UtilizationDetector(
        p.number("queueDepthThreshold", 5, minimum=0),
        p.number("kvCacheUtilThreshold", 0.8, minimum=0, maximum=1),
        p.number("headroom", 0.0, minimum=0),
        staleness,
        name,
    )


def _concurrency(name: str, p: Params, deps: PluginDeps) -> ConcurrencyDetector:
    return ConcurrencyDetector(
        p.text("concurrencyMode", "requests", choices=MODES),
        p.integer("maxConcurrency", 100, minimum=1),
        p.integer("maxTokenConcurrency", 1_000_000, minimum=1),
        p.number("headroom", 0.0, minimum=0),
        name,
    )


def _program_aware(name: str, p: Params, deps: PluginDeps) -> ProgramAwareFairness:
    p.text("strategy", "las", choices=("las",))
    return ProgramAwareFairness(
        name,
        weight_service=p.number("lasWeightService", 0.8, minimum=0),
        weight_head_wait=p.number("lasWeightHeadWait", 0.2, minimum=0),
        half_life=p.number("lasHalfLifeSeconds", 60, minimum=0),
        eviction_ttl=p.number("evictionTtlSeconds", 3600, minimum=0),
        eviction_sweep=p.number("evictionSweepSeconds", 300, minimum=0),
    )


def _holdback(name: str, p: Params, deps: PluginDeps) -> PriorityHoldback:
    p.text("shape", "linear", choices=("linear",))
    domain = p.text("domain", "rank", choices=("rank", "value"))
    if p.raw.get("minCeiling") is None:
        raise config_error(f"{p.where}.minCeiling: required (a number in (0, 1])")
    lo = p.number("minCeiling", 0.5, minimum=0, maximum=1)
    hi = p.number("maxCeiling", 1.0, minimum=0, maximum=1)
    if not 0 < lo <= hi:
        raise config_error(f"{p.where}: need 0 < minCeiling <= maxCeiling <= 1, got {lo}, {hi}")
    return PriorityHoldback(lo, hi, domain, name)


def _static(name: str, p: Params, deps: PluginDeps) -> StaticUsageLimit:
    threshold = p.number("threshold", 1.0, minimum=0, maximum=1)
    if threshold <= 0:
        raise config_error(f"{p.where}.threshold: must be in (0, 1], got {threshold}")
    return StaticUsageLimit(threshold, name)


def _plain(cls: type) -> Factory:
    def create(name: str, p: Params, deps: PluginDeps) -> object:
        return cls(name)

    return create


FACTORIES: dict[str, Factory] = {
    "utilization-detector": _utilization,
    "concurrency-detector": _concurrency,
    "global-strict-fairness-policy": _plain(GlobalStrictFairness),
    "round-robin-fairness-policy": _plain(RoundRobinFairness),
    "program-aware-fairness": _program_aware,
    "fcfs-ordering-policy": _plain(FcfsOrdering),
    "edf-ordering-policy": _plain(EdfOrdering),
    "slo-deadline-ordering-policy": _plain(SloDeadlineOrdering),
    "static-usage-limit-policy": _static,
    "priority-holdback-policy": _holdback,
    "soft-reflective-ceiling-policy": _plain(SoftReflectiveCeiling),
}


def create_default(type_name: str, where: str) -> object:
    """A flow-control plugin of ``type_name`` with default parameters (a ``...Ref`` naming a type)."""
    factory = FACTORIES.get(type_name)
    if factory is None:
        raise config_error(
            f"{where}: {type_name!r} is neither a defined plugin nor a flow-control plugin type; "
            f"valid types: {', '.join(sorted(FACTORIES))}"
        )
    params = Params({}, where)
    return factory(type_name, params, PluginDeps(LocalLearnedState(), SystemClock()))
