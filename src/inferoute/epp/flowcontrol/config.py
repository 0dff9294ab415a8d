"""The ``flowControl:`` section of an EndpointPickerConfig, with the reference's fields and defaults.

* ``maxBytes`` -- global cap on queued bytes (a Quantity: ``1G``, ``512Mi``, ``1000``); 0 or unset: none.
* ``maxRequests`` -- global cap on queued requests; 0 or unset: unlimited.
* ``defaultRequestTTL`` -- queue-wait budget while the pool has endpoints, default ``60s``; ``0s`` disables
  expiry. A request's own ``x-llm-d-request-ttl-ms`` header is clamped to it (the reference's open TODO).
* ``noEndpointRequestTTL`` -- the budget while the pool has *no* endpoints (a scale-from-zero waiting room);
  default: ``defaultRequestTTL``, or 60s.
* ``defaultPriorityBand`` -- template for priorities not listed in ``priorityBands``;
  ``defaultNegativePriorityBand`` -- template for priority < 0 (default: ``defaultPriorityBand``).
* ``priorityBands[]`` -- ``{priority, maxBytes (1G), maxRequests (5000), fairnessPolicyRef
  (global-strict-fairness-policy), orderingPolicyRef (fcfs-ordering-policy)}``; 0 limits mean the default.
* ``usageLimitPolicyPluginRef`` -- default ``static-usage-limit-policy`` (threshold 1.0).
* ``saturationDetector: {pluginRef}`` -- default: a detector declared in ``plugins:``, else
  ``utilization-detector``.
* ``enableEviction`` -- default false. ``true``: in-flight sheddable requests (priority < 0) are evicted when
  higher-priority requests are queued behind saturation (:mod:`~inferoute.epp.flowcontrol.eviction`).

A ``...Ref`` names a plugin of the config's ``plugins:`` list, or directly a flow-control plugin type (then
with default parameters). Bands for unseen priorities are made on demand from the templates.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from inferoute.epp.flowcontrol import plugins as fp
from inferoute.epp.flowcontrol.plugins import create_default
from inferoute.epp.flowcontrol.types import (
    FairnessPolicy,
    OrderingPolicy,
    SaturationDetector,
    UsageLimitPolicy,
)
from inferoute.epp.flowcontrol.units import duration, quantity
from inferoute.epp.plugin import config_error

FEATURE_GATE = "flowControl"
DEFAULT_TTL = 60.0
BAND_MAX_BYTES = 1_000_000_000
BAND_MAX_REQUESTS = 5000
TOP = (
    "maxBytes",
    "maxRequests",
    "defaultRequestTTL",
    "noEndpointRequestTTL",
    "defaultPriorityBand",
    "defaultNegativePriorityBand",
    "priorityBands",
    "usageLimitPolicyPluginRef",
    "saturationDetector",
    "enableEviction",
)
BAND_KEYS = ("priority", "maxBytes", "maxRequests", "fairnessPolicyRef", "orderingPolicyRef")


@dataclass(slots=True)
class BandConfig:
    priority: int
    max_bytes: int = BAND_MAX_BYTES
    max_requests: int = BAND_MAX_REQUESTS
    fairness: FairnessPolicy | None = None
    ordering: OrderingPolicy | None = None


@dataclass(slots=True)
class FlowControlConfig:
    detector: SaturationDetector
    usage_limit: UsageLimitPolicy
    default_band: BandConfig
    max_bytes: int = 0
    max_requests: int = 0
    default_ttl: float | None = DEFAULT_TTL
    no_endpoint_ttl: float | None = DEFAULT_TTL
    default_negative_band: BandConfig | None = None
    bands: dict[int, BandConfig] = field(default_factory=dict)
    enable_eviction: bool = False

    def band(self, priority: int) -> BandConfig:
        """The band config for ``priority``: listed, else the (negative) template."""
        b = self.bands.get(priority)
        if b is not None:
            return b
        tpl = self.default_negative_band if priority < 0 and self.default_negative_band else self.default_band
        return BandConfig(priority, tpl.max_bytes, tpl.max_requests, tpl.fairness, tpl.ordering)


def gate_enabled(gates: tuple[str, ...], name: str = FEATURE_GATE) -> bool:
    """``featureGates`` entries: ``name`` or ``name=true`` enable, ``name=false`` disables (last wins)."""
    on = False
    for g in gates:
        key, _, value = g.partition("=")
        if key.strip() == name:
            on = value.strip().lower() not in ("false", "0", "no") if value else True
    return on


def _resolve(ref: Any, role: tuple[type, ...], plugins: Mapping[str, object], where: str) -> Any:
    if not isinstance(ref, str) or not ref:
        raise config_error(f"{where}: expected a plugin name or type")
    plugin = plugins.get(ref)
    if plugin is None:
        plugin = create_default(ref, where)
    if not isinstance(plugin, role):
        valid = ", ".join(sorted(c.type_name for c in role))  # type: ignore[attr-defined]
        raise config_error(f"{where}: {ref!r} is a {type(plugin).__name__}; expected one of: {valid}")
    return plugin


def _band(raw: Any, where: str, plugins: Mapping[str, object], priority: int | None) -> BandConfig:
    if not isinstance(raw, Mapping):
        raise config_error(f"{where}: expected a mapping")
    unknown = sorted(set(raw) - set(BAND_KEYS))
    if unknown:
        raise config_error(f"{where}: unknown key(s) {unknown}; valid: {', '.join(BAND_KEYS)}")
    if priority is None:
        p = raw.get("priority")
        if isinstance(p, bool) or not isinstance(p, int):
            raise config_error(f"{where}.priority: required integer")
        priority = p
    mb = quantity(raw.get("maxBytes", 0), f"{where}.maxBytes") or BAND_MAX_BYTES
    mr = quantity(raw.get("maxRequests", 0), f"{where}.maxRequests") or BAND_MAX_REQUESTS
    fair = _resolve(
        raw.get("fairnessPolicyRef", fp.DEFAULT_FAIRNESS), fp.FAIRNESS, plugins, f"{where}.fairnessPolicyRef"
    )
    order = _resolve(
        raw.get("orderingPolicyRef", fp.DEFAULT_ORDERING), fp.ORDERING, plugins, f"{where}.orderingPolicyRef"
    )
    return BandConfig(priority, mb, mr, fair, order)


def parse_flow_control(
    raw: Mapping[str, Any] | None, plugins: Mapping[str, object], where: str
) -> FlowControlConfig:
    """The engine config from the raw section (None: every default)."""
    raw = raw or {}
    unknown = sorted(set(raw) - set(TOP))
    if unknown:
        raise config_error(f"{where}: unknown key(s) {unknown}; valid: {', '.join(TOP)}")
    det_raw = raw.get("saturationDetector") or {}
    if not isinstance(det_raw, Mapping) or set(det_raw) - {"pluginRef"}:
        raise config_error(f"{where}.saturationDetector: expected {{pluginRef}}")
    defined = [p for p in plugins.values() if isinstance(p, fp.DETECTORS)]
    if "pluginRef" in det_raw or not defined:  # else a detector declared in plugins: is the one meant
        ref = det_raw.get("pluginRef", fp.DEFAULT_DETECTOR)
        detector = _resolve(ref, fp.DETECTORS, plugins, f"{where}.saturationDetector.pluginRef")
    else:
        detector = defined[0]
    usage = _resolve(
        raw.get("usageLimitPolicyPluginRef", fp.DEFAULT_USAGE),
        fp.USAGE_LIMITS,
        plugins,
        f"{where}.usageLimitPolicyPluginRef",
    )
    default_band = _band(raw.get("defaultPriorityBand") or {}, f"{where}.defaultPriorityBand", plugins, 0)
    neg = raw.get("defaultNegativePriorityBand")
    neg_band = None if neg is None else _band(neg, f"{where}.defaultNegativePriorityBand", plugins, -1)
    bands: dict[int, BandConfig] = {}
    pb = raw.get("priorityBands") or []
    if not isinstance(pb, list):
        raise config_error(f"{where}.priorityBands: expected a list")
    for i, b in enumerate(pb):
        band = _band(b, f"{where}.priorityBands[{i}]", plugins, None)
        if band.priority in bands:
            raise config_error(f"{where}.priorityBands[{i}].priority: duplicate priority {band.priority}")
        bands[band.priority] = band
    ttl = duration(raw.get("defaultRequestTTL", DEFAULT_TTL), f"{where}.defaultRequestTTL")
    no_ep_raw = raw.get("noEndpointRequestTTL")
    no_ep = ttl if no_ep_raw is None and "defaultRequestTTL" in raw else DEFAULT_TTL
    if no_ep_raw is not None:
        no_ep = duration(no_ep_raw, f"{where}.noEndpointRequestTTL")
    evict = raw.get("enableEviction", False)
    if not isinstance(evict, bool):
        raise config_error(f"{where}.enableEviction: expected true or false")
    return FlowControlConfig(
        detector,
        usage,
        default_band,
        max_bytes=quantity(raw.get("maxBytes", 0), f"{where}.maxBytes"),
        max_requests=quantity(raw.get("maxRequests", 0), f"{where}.maxRequests"),
        default_ttl=ttl or None,
        no_endpoint_ttl=no_ep or None,
        default_negative_band=neg_band,
        bands=bands,
        enable_eviction=evict,
    )
