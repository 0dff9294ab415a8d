"""``EndpointPickerConfig``: GIE's picker configuration file, loaded into a ready :class:`PickerConfig`.

Accepted shape (``apiVersion: inference.networking.x-k8s.io/v1alpha1`` or ``llm-d.ai/v1alpha1``)::

    plugins:            [{type, name?, parameters?}]        # name defaults to type
    schedulingProfiles: [{name, plugins: [{pluginRef, weight?}]}]
    dataLayer:          {sources: [{pluginRef, extractors: [{pluginRef}]}]}   # `data:` also accepted
    saturationDetector: {pluginRef}
    parser:             {pluginRef}
    featureGates: [flowControl]                              # "name", "name=true" or "name=false"
    flowControl:        {...}                                # parsed by inferoute.epp.flowcontrol.config
    objectives:         [{name, priority}]                   # inferoute: InferenceObjectives in the YAML
    modelRewrites:      [{name, rules: [{matches, targets}]}] # inferoute: InferenceModelRewrites in the YAML

Rules (GIE's): without ``schedulingProfiles`` one ``default`` profile references every scorer and picker; a
profile without a picker gets ``max-score-picker``; a scorer without a weight gets 1 (the engine itself always
requires an explicit positive weight). Every mistake raises :class:`~inferoute.errors.InferouteError`
(cause ``config``) naming the key and the valid choices.

Built-in profiles (``src/inferoute/epp/profiles/*.yaml``): ``gie-default`` (the default when no config is
given: queue 2, kv-cache 2, prefix 3), ``predicted-ttft``, ``round-robin``, ``random``, ``precise``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

from inferoute.epp.datalayer.plugins import CoreMetricsExtractor, MetricsDataSource
from inferoute.epp.flowcontrol import SaturationDetector, UtilizationDetector
from inferoute.epp.flowcontrol.config import FlowControlConfig, gate_enabled, parse_flow_control
from inferoute.epp.flowcontrol.plugins import DETECTORS, create_default
from inferoute.epp.plugin import Params, PluginBinder, PluginDeps, config_error
from inferoute.epp.requestcontrol.slo_admitter import LatencySloAdmitter
from inferoute.epp.requestcontrol.store import RequestControlStore, load_objectives, load_rewrites
from inferoute.epp.scheduling.framework import (
    ObserverFactory,
    Scheduler,
    SchedulerProfile,
    WeightedScorer,
    is_shadow,
    no_observer,
)
from inferoute.epp.scheduling.plugins.config_plugins import PrefixProducer
from inferoute.epp.scheduling.plugins.prefix_cache_scorer import PrefixCacheScorer
from inferoute.epp.scheduling.registry import PluginRegistry, builtin_registry
from inferoute.epp.scheduling.types import Filter, PickerPlugin, PrefixSettings, Scorer

log = logging.getLogger(__name__)

API_VERSIONS = ("inference.networking.x-k8s.io/v1alpha1", "llm-d.ai/v1alpha1")
TOP_KEYS = (
    "apiVersion",
    "kind",
    "featureGates",
    "plugins",
    "schedulingProfiles",
    "saturationDetector",
    "dataLayer",
    "data",
    "flowControl",
    "parser",
    "objectives",
    "modelRewrites",
)
BUILTIN_PROFILES = ("gie-default", "predicted-ttft", "round-robin", "random", "precise")


def builtin_profile_text(name: str) -> str:
    """The YAML of a built-in profile; a config error lists the valid names."""
    if name not in BUILTIN_PROFILES:
        raise config_error(f"unknown built-in profile {name!r}; valid: {', '.join(BUILTIN_PROFILES)}")
    return resources.files("inferoute.epp.profiles").joinpath(f"{name}.yaml").read_text()


DEFAULT_CONFIG_NAME = "gie-default"


@dataclass(slots=True)
class PickerConfig:
    """What the assembly wires: the scheduler plus the data-layer and admission settings."""

    scheduler: Scheduler
    prefix: PrefixSettings
    metrics_scheme: str = "http"
    metrics_path: str = "/metrics"
    metrics_insecure: bool = True
    default_engine: str = "vllm"
    saturation: SaturationDetector | None = None
    feature_gates: tuple[str, ...] = ()
    store: RequestControlStore = field(default_factory=RequestControlStore)
    """Objectives and model rewrites declared in the YAML (other sources add theirs at run time)."""
    flow_control: Mapping[str, Any] | None = None
    """The raw ``flowControl:`` section; :mod:`inferoute.epp.flowcontrol.config` parses it."""
    plugins: Mapping[str, object] = field(default_factory=dict)
    """Every plugin instance by name (flow control resolves its ``...Ref`` fields here)."""
    source: str = "config"
    admitters: list[LatencySloAdmitter] = field(default_factory=list)
    """Admission plugins run before scheduling (``latency-slo-admitter``)."""
    flow: FlowControlConfig | None = None
    """Flow control's engine config when the ``flowControl`` feature gate is on (None: legacy admission)."""


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise config_error(f"{where}: expected a mapping")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise config_error(f"{where}: expected a list")
    return value


def _check_keys(m: Mapping[str, Any], valid: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(m) - set(valid))
    if unknown:
        raise config_error(f"{where}: unknown key(s) {unknown}; valid: {', '.join(valid)}")


def _ref(m: Any, where: str, plugins: Mapping[str, object]) -> object:
    m = _mapping(m, where)
    _check_keys(m, ("pluginRef", "extractors", "weight"), where)
    ref = m.get("pluginRef")
    if not isinstance(ref, str) or ref not in plugins:
        raise config_error(
            f"{where}.pluginRef: {ref!r} is not a defined plugin; defined: {', '.join(plugins) or '(none)'}"
        )
    return plugins[ref]


def _detector(doc: Mapping[str, Any], plugins: Mapping[str, object], source: str) -> SaturationDetector:
    """The saturation detector: ``flowControl.saturationDetector`` (also used with the gate off, as in the
    reference), else the deprecated top-level ``saturationDetector``, else a defined detector plugin, else
    a default ``utilization-detector``."""
    fc = _mapping(doc.get("flowControl"), f"{source}.flowControl")
    where, ref = f"{source}.flowControl.saturationDetector", fc.get("saturationDetector")
    if ref is None:
        where, ref = f"{source}.saturationDetector", doc.get("saturationDetector")
    if ref is not None:
        name = _mapping(ref, where).get("pluginRef")
        d = plugins.get(name) if isinstance(name, str) and name in plugins else None
        if d is None:
            d = create_default(name if isinstance(name, str) else "", f"{where}.pluginRef")
        if not isinstance(d, DETECTORS):
            raise config_error(f"{where}.pluginRef: expected a utilization-detector or concurrency-detector")
        return d
    for p in plugins.values():
        if isinstance(p, DETECTORS):
            return p
    return UtilizationDetector()


def parse_config(
    text: str | None,
    *,
    deps: PluginDeps,
    observer: ObserverFactory = no_observer,
    registry: PluginRegistry | None = None,
    source: str = "config",
) -> PickerConfig:
    """Load an EndpointPickerConfig (None or blank: the GIE default)."""
    registry = registry or builtin_registry()
    if text is None or not text.strip():
        text = builtin_profile_text(DEFAULT_CONFIG_NAME)
        source = f"built-in {DEFAULT_CONFIG_NAME}"
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise config_error(f"{source}: invalid YAML: {exc}") from exc
    doc = _mapping(doc, source)
    _check_keys(doc, TOP_KEYS, source)
    api = doc.get("apiVersion")
    if api is not None and api not in API_VERSIONS:
        raise config_error(f"{source}.apiVersion: {api!r} is not supported; valid: {', '.join(API_VERSIONS)}")
    kind = doc.get("kind")
    if kind is not None and kind != "EndpointPickerConfig":
        raise config_error(f"{source}.kind: {kind!r}; valid: EndpointPickerConfig")

    # 1. instantiate every plugin
    plugins: dict[str, object] = {}
    for i, item in enumerate(_list(doc.get("plugins"), f"{source}.plugins")):
        where = f"{source}.plugins[{i}]"
        item = _mapping(item, where)
        _check_keys(item, ("type", "name", "parameters"), where)
        type_name = item.get("type")
        if not isinstance(type_name, str):
            raise config_error(f"{where}.type: required; valid: {', '.join(registry.types())}")
        name = item.get("name") or type_name
        if not isinstance(name, str):
            raise config_error(f"{where}.name: expected a string")
        if name in plugins:
            raise config_error(f"{where}.name: duplicate plugin name {name!r}")
        params = Params(item.get("parameters"), f"{where}.parameters")
        plugins[name] = registry.create(type_name, name, params, deps)
    for plugin in plugins.values():
        if isinstance(plugin, PluginBinder):
            plugin.bind(plugins)

    # 2. profiles
    raw_profiles = _list(doc.get("schedulingProfiles"), f"{source}.schedulingProfiles")
    if not raw_profiles:
        refs = [{"pluginRef": n} for n, p in plugins.items() if isinstance(p, Scorer | PickerPlugin | Filter)]
        raw_profiles = [{"name": "default", "plugins": refs}]
    profiles: list[SchedulerProfile] = []
    for i, raw in enumerate(raw_profiles):
        where = f"{source}.schedulingProfiles[{i}]"
        raw = _mapping(raw, where)
        _check_keys(raw, ("name", "plugins"), where)
        pname = raw.get("name")
        if not isinstance(pname, str) or not pname:
            raise config_error(f"{where}.name: required string")
        filters: list[Filter] = []
        scorers: list[WeightedScorer] = []
        picker: PickerPlugin | None = None
        for j, ref in enumerate(_list(raw.get("plugins"), f"{where}.plugins")):
            rwhere = f"{where}.plugins[{j}]"
            plugin = _ref(ref, rwhere, plugins)
            weight = ref.get("weight")
            if isinstance(plugin, Scorer):
                if weight is None:
                    weight = 1.0
                if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
                    raise config_error(f"{rwhere}.weight: expected a positive number, got {weight!r}")
                scorers.append(WeightedScorer(plugin, float(weight)))
            elif weight is not None:
                raise config_error(f"{rwhere}.weight: only scorers take a weight")
            elif isinstance(plugin, PickerPlugin):
                if picker is not None:
                    raise config_error(f"{rwhere}: profile {pname} already has picker {picker.name}")
                picker = plugin
            elif isinstance(plugin, Filter):
                filters.append(plugin)
            else:
                raise config_error(
                    f"{rwhere}.pluginRef: {ref.get('pluginRef')!r} is not a filter, scorer or picker; valid "
                    f"scheduling types: {', '.join(registry.types('scorer') + registry.types('picker'))}"
                )
        if picker is None:
            mp = registry.create("max-score-picker", "max-score-picker", Params({}, f"{where}.picker"), deps)
            assert isinstance(mp, PickerPlugin)
            picker = mp
        profiles.append(SchedulerProfile(pname, filters, scorers, picker, observer=observer))
    live = [p.name for p in profiles if not is_shadow(p.name)]
    if len(live) != 1:
        raise config_error(
            f"{source}.schedulingProfiles: single-profile-handler runs exactly one live profile, got "
            f"{len(live)} ({', '.join(live) or 'none'}); name the others shadow or shadow-* to dark-launch "
            "them"
        )

    # 3. prefix settings: the producer's, else a prefix scorer's own parameters, else defaults
    prefix = PrefixSettings()
    producers = [p for p in plugins.values() if isinstance(p, PrefixProducer)]
    scorer_settings = [
        p.settings for p in plugins.values() if isinstance(p, PrefixCacheScorer) and p.settings
    ]
    if producers:
        prefix = producers[0].settings
    elif scorer_settings:
        prefix = scorer_settings[0]

    # 4. data layer and saturation detector
    cfg = PickerConfig(Scheduler(profiles), prefix)
    dl_key = "dataLayer" if "dataLayer" in doc else "data"
    data_layer = _mapping(doc.get(dl_key), f"{source}.{dl_key}")
    _check_keys(data_layer, ("sources", "discovery"), f"{source}.{dl_key}")
    sources = [p for p in plugins.values() if isinstance(p, MetricsDataSource)]
    extractors = [p for p in plugins.values() if isinstance(p, CoreMetricsExtractor)]
    for k, src in enumerate(_list(data_layer.get("sources"), f"{source}.{dl_key}.sources")):
        swhere = f"{source}.{dl_key}.sources[{k}]"
        plugin = _ref(src, swhere, plugins)
        if not isinstance(plugin, MetricsDataSource):
            raise config_error(f"{swhere}.pluginRef: expected a metrics-data-source")
        sources = [plugin]
        for m, ex in enumerate(_list(src.get("extractors"), f"{swhere}.extractors")):
            e = _ref(ex, f"{swhere}.extractors[{m}]", plugins)
            if not isinstance(e, CoreMetricsExtractor):
                raise config_error(f"{swhere}.extractors[{m}].pluginRef: expected a core-metrics-extractor")
            extractors = [e]
    if sources:
        cfg.metrics_scheme, cfg.metrics_path = sources[0].scheme, sources[0].path
        cfg.metrics_insecure = sources[0].insecure_skip_verify
    if extractors:
        cfg.default_engine = extractors[0].default_engine
    cfg.saturation = _detector(doc, plugins, source)
    gates = _list(doc.get("featureGates"), f"{source}.featureGates")
    cfg.feature_gates = tuple(str(g) for g in gates)
    load_objectives(cfg.store, doc.get("objectives"), f"{source}.objectives")
    load_rewrites(cfg.store, doc.get("modelRewrites"), f"{source}.modelRewrites")
    if "flowControl" in doc:
        cfg.flow_control = _mapping(doc.get("flowControl"), f"{source}.flowControl")
    if gate_enabled(cfg.feature_gates):
        cfg.flow = parse_flow_control(cfg.flow_control, plugins, f"{source}.flowControl")
        cfg.saturation = cfg.flow.detector
    elif cfg.flow_control:
        log.warning("%s: flowControl is ignored (featureGates does not enable flowControl)", source)
    cfg.plugins, cfg.source = plugins, source
    cfg.admitters = [p for p in plugins.values() if isinstance(p, LatencySloAdmitter)]
    return cfg
