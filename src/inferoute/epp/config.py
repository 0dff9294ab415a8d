"""``EndpointPickerConfig``: GIE's picker configuration file, validated into msgspec structs, then built into
a ready :class:`PickerConfig`.

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

Two steps, so that each mistake is reported where it is: :class:`EndpointPickerConfig` (msgspec) checks the
shape -- unknown keys, missing keys, wrong types -- and its errors are rewritten to name the exact key path
and the valid keys or values; then :func:`parse_config` checks meaning -- plugin types, references between
plugins, weights -- the same way. Every mistake raises :class:`~inferoute.errors.ConfigError` whose text is
``<source>: <key path>: <what is wrong>; valid: ...``, e.g. ``config: plugins[0].type: unknown plugin type
'queue-scorr'; valid: ...``. The ``flowControl``, ``objectives`` and ``modelRewrites`` sections are kept raw
here and parsed by the layer that owns them.

Rules (GIE's): without ``schedulingProfiles`` one ``default`` profile references every scorer and picker; a
profile without a picker gets ``max-score-picker``; a scorer without a weight gets 1 (the engine itself always
requires an explicit positive weight). A profile handler declared in ``plugins:`` decides which live
profiles run (``single-profile-handler``, the default: exactly one; ``disagg-profile-handler`` /
``pd-profile-handler``: a decode and a prefill profile, see :mod:`inferoute.epp.scheduling.handlers`);
profiles named ``shadow``/``shadow-*`` run beside them (dark launch). Flow control's section is handed to
:func:`~inferoute.epp.flowcontrol.config.parse_flow_control` when ``featureGates`` enables it.

Built-in profiles (``src/inferoute/epp/profiles/*.yaml``): ``gie-default`` (the default when no config is
given: queue 2, kv-cache 2, prefix 3), ``predicted-ttft``, ``round-robin``, ``random``, ``precise``.
"""

from __future__ import annotations

import difflib
import logging
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Annotated, Any, Literal

import msgspec
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
    ProfileHandler,
    Scheduler,
    SchedulerProfile,
    WeightedScorer,
    no_observer,
)
from inferoute.epp.scheduling.plugins.config_plugins import PrefixProducer
from inferoute.epp.scheduling.plugins.prefix_cache_scorer import PrefixCacheScorer
from inferoute.epp.scheduling.registry import PluginRegistry, builtin_registry
from inferoute.epp.scheduling.types import Filter, PickerPlugin, PrefixSettings, Scorer

log = logging.getLogger(__name__)

API_VERSIONS = ("inference.networking.x-k8s.io/v1alpha1", "llm-d.ai/v1alpha1")
BUILTIN_PROFILES = ("gie-default", "predicted-ttft", "round-robin", "random", "precise")
DEFAULT_CONFIG_NAME = "gie-default"

NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]


class _Spec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A section of the file: unknown keys are errors."""


class PluginSpec(_Spec):
    type: str
    name: str | None = None
    """Defaults to ``type``."""
    parameters: dict[str, Any] | None = None
    """Read by the plugin's factory through :class:`~inferoute.epp.plugin.Params`."""


class ProfilePluginRef(_Spec):
    pluginRef: str
    weight: float | None = None
    """Scorers only; 1 when absent."""


class SchedulingProfileSpec(_Spec):
    name: NonEmpty
    plugins: list[ProfilePluginRef] = []


class PluginRef(_Spec):
    pluginRef: str


class DataSourceSpec(_Spec):
    pluginRef: str
    extractors: list[PluginRef] = []


class DataLayerSpec(_Spec):
    sources: list[DataSourceSpec] = []
    discovery: Any = None


class EndpointPickerConfig(_Spec):
    """The file as written (shape only; :func:`parse_config` checks what it means)."""

    apiVersion: Literal["inference.networking.x-k8s.io/v1alpha1", "llm-d.ai/v1alpha1"] | None = None
    kind: Literal["EndpointPickerConfig"] | None = None
    featureGates: list[str] = []
    plugins: list[PluginSpec] = []
    schedulingProfiles: list[SchedulingProfileSpec] = []
    dataLayer: DataLayerSpec | None = None
    data: DataLayerSpec | None = None
    """The older name of ``dataLayer``."""
    saturationDetector: PluginRef | None = None
    parser: PluginRef | None = None
    flowControl: dict[str, Any] | None = None
    """Raw: :mod:`inferoute.epp.flowcontrol.config` parses it (see :attr:`PickerConfig.flow_control`)."""
    objectives: Any = None
    """Raw: :func:`~inferoute.epp.requestcontrol.store.load_objectives` parses it."""
    modelRewrites: Any = None
    """Raw: :func:`~inferoute.epp.requestcontrol.store.load_rewrites` parses it."""


def builtin_profile_text(name: str) -> str:
    """The YAML of a built-in profile; a config error lists the valid names."""
    if name not in BUILTIN_PROFILES:
        raise config_error(f"unknown built-in profile {name!r}; valid: {', '.join(BUILTIN_PROFILES)}")
    return resources.files("inferoute.epp.profiles").joinpath(f"{name}.yaml").read_text()


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


# ------------------------------------------------------------------------------------------ shape errors

_TYPE_NAMES = {
    "object": "a mapping",
    "array": "a list",
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "null": "nothing",
}
_TOKEN = re.compile(r"\.?([A-Za-z_]\w*)|\[(\d+)\]")


def _type_at(root: Any, path: str) -> Any:
    """The declared type at a msgspec error path (``plugins[0].type``), or None when it cannot be told."""
    tp = root
    for name, _index in _TOKEN.findall(path):
        tp = _unwrap(tp)
        if name:
            hints = typing.get_type_hints(tp) if isinstance(tp, type) else {}
            tp = hints.get(name)
        elif typing.get_origin(tp) is list:
            tp = typing.get_args(tp)[0]
        else:
            return None
    return _unwrap(tp)


def _unwrap(tp: Any) -> Any:
    """``X | None`` -> X; ``Annotated[X, ...]`` -> X."""
    if typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, type(int | None)) and len(args) == 1:
        return _unwrap(args[0])
    return tp


def _keys_of(tp: Any) -> str:
    return ", ".join(f.name for f in msgspec.structs.fields(tp)) if isinstance(tp, type) else "(unknown)"


def explain(exc: msgspec.ValidationError, root: Any = EndpointPickerConfig) -> str:
    """A msgspec validation error as ``<key path>: <what is wrong>; valid: ...``."""
    found = re.fullmatch(r"(?s)(.*?)(?: - at `\$(.*)`)?", str(exc))
    assert found is not None  # the pattern matches any text
    what, path = found.group(1), (found.group(2) or "").lstrip(".")
    if m := re.fullmatch(r"Object contains unknown field `(.+)`", what):
        key = f"{path}.{m.group(1)}" if path else m.group(1)
        return f"{key}: unknown key; valid: {_keys_of(_type_at(root, path))}"
    if m := re.fullmatch(r"Object missing required field `(.+)`", what):
        return f"{path}.{m.group(1)}: required" if path else f"{m.group(1)}: required"
    where = path or "(top level)"
    if m := re.fullmatch(r"Invalid enum value (.+)", what):
        choices = [a for a in typing.get_args(_type_at(root, path)) if isinstance(a, str)]
        return f"{where}: {m.group(1)} is not supported; valid: {', '.join(choices)}"
    if m := re.fullmatch(r"Expected `([\w |]+)`(.*), got `(\w+)`", what):
        expected, rest, got = m.groups()
        wanted = " or ".join(_TYPE_NAMES.get(t, t) for t in expected.split(" | ") if t != "null")
        return f"{where}: expected {wanted}{rest}, got {_TYPE_NAMES.get(got, got)}"
    if m := re.fullmatch(r"Expected `(\w+)`(.*)", what):  # a constraint (length, range) not met
        return f"{where}: expected {_TYPE_NAMES.get(m.group(1), m.group(1))}{m.group(2)}"
    return f"{where}: {what}"


def load_document(text: str, source: str) -> EndpointPickerConfig:
    """YAML text -> :class:`EndpointPickerConfig`, or a ConfigError naming the key."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise config_error(f"{source}: invalid YAML: {exc}") from exc
    if doc is None:
        doc = {}
    try:
        return msgspec.convert(doc, EndpointPickerConfig)
    except msgspec.ValidationError as exc:
        raise config_error(f"{source}: {explain(exc)}") from exc


# ------------------------------------------------------------------------------------------ meaning


def _plugins(
    spec: EndpointPickerConfig, registry: PluginRegistry, deps: PluginDeps, source: str
) -> dict[str, object]:
    """Every plugin of ``plugins:``, instantiated, by name."""
    plugins: dict[str, object] = {}
    for i, item in enumerate(spec.plugins):
        where = f"{source}: plugins[{i}]"
        registry.spec(item.type, f"{where}.type")
        name = item.name or item.type
        if name in plugins:
            raise config_error(f"{where}.name: duplicate plugin name {name!r}")
        plugins[name] = registry.create(item.type, name, Params(item.parameters, f"{where}.parameters"), deps)
    for plugin in plugins.values():
        if isinstance(plugin, PluginBinder):
            plugin.bind(plugins)
    return plugins


def _lookup(ref: str, where: str, plugins: Mapping[str, object]) -> object:
    if ref not in plugins:
        raise config_error(
            f"{where}.pluginRef: {ref!r} is not a defined plugin; defined: {', '.join(plugins) or '(none)'}"
        )
    return plugins[ref]


def _profile(
    spec: SchedulingProfileSpec,
    where: str,
    plugins: Mapping[str, object],
    registry: PluginRegistry,
    deps: PluginDeps,
    observer: ObserverFactory,
) -> SchedulerProfile:
    filters: list[Filter] = []
    scorers: list[WeightedScorer] = []
    picker: PickerPlugin | None = None
    for j, ref in enumerate(spec.plugins):
        rwhere = f"{where}.plugins[{j}]"
        plugin = _lookup(ref.pluginRef, rwhere, plugins)
        if isinstance(plugin, Scorer):
            weight = 1.0 if ref.weight is None else ref.weight
            if not weight > 0:
                raise config_error(f"{rwhere}.weight: expected a positive number, got {ref.weight!r}")
            scorers.append(WeightedScorer(plugin, weight))
        elif ref.weight is not None:
            raise config_error(f"{rwhere}.weight: only scorers take a weight")
        elif isinstance(plugin, PickerPlugin):
            if picker is not None:
                raise config_error(f"{rwhere}: profile {spec.name} already has picker {picker.name}")
            picker = plugin
        elif isinstance(plugin, Filter):
            filters.append(plugin)
        else:
            raise config_error(
                f"{rwhere}.pluginRef: {ref.pluginRef!r} is not a filter, scorer or picker; valid "
                f"scheduling types: {', '.join(registry.types('scorer') + registry.types('picker'))}"
            )
    if picker is None:
        mp = registry.create("max-score-picker", "max-score-picker", Params({}, f"{where}.picker"), deps)
        assert isinstance(mp, PickerPlugin)
        picker = mp
    return SchedulerProfile(spec.name, filters, scorers, picker, observer=observer)


def _scheduler(
    spec: EndpointPickerConfig,
    plugins: Mapping[str, object],
    registry: PluginRegistry,
    deps: PluginDeps,
    observer: ObserverFactory,
    source: str,
) -> Scheduler:
    specs = spec.schedulingProfiles or [
        SchedulingProfileSpec(
            name="default",
            plugins=[
                ProfilePluginRef(pluginRef=n)
                for n, p in plugins.items()
                if isinstance(p, Scorer | PickerPlugin | Filter)
            ],
        )
    ]
    profiles = [
        _profile(p, f"{source}: schedulingProfiles[{i}]", plugins, registry, deps, observer)
        for i, p in enumerate(specs)
    ]
    handlers = [p for p in plugins.values() if isinstance(p, ProfileHandler)]
    if len(handlers) > 1:
        names = ", ".join(h.name for h in handlers)
        raise config_error(f"{source}: plugins: one profile handler per config, got {names}")
    try:
        return Scheduler(profiles, handlers[0] if handlers else None)
    except ValueError as exc:
        raise config_error(f"{source}: schedulingProfiles: {exc}") from exc


def _prefix_settings(plugins: Mapping[str, object]) -> PrefixSettings:
    """The producer's settings, else a prefix scorer's own parameters, else the defaults."""
    for p in plugins.values():
        if isinstance(p, PrefixProducer):
            return p.settings
    for p in plugins.values():
        if isinstance(p, PrefixCacheScorer) and p.settings:
            return p.settings
    return PrefixSettings()


def _data_layer(cfg: PickerConfig, spec: EndpointPickerConfig, plugins: Mapping[str, object]) -> None:
    """How to scrape: the referenced (else the declared) metrics data source and core metrics extractor."""
    key, layer = ("dataLayer", spec.dataLayer) if spec.dataLayer is not None else ("data", spec.data)
    sources = [p for p in plugins.values() if isinstance(p, MetricsDataSource)]
    extractors = [p for p in plugins.values() if isinstance(p, CoreMetricsExtractor)]
    for k, src in enumerate(layer.sources if layer else []):
        where = f"{cfg.source}: {key}.sources[{k}]"
        plugin = _lookup(src.pluginRef, where, plugins)
        if not isinstance(plugin, MetricsDataSource):
            raise config_error(f"{where}.pluginRef: expected a metrics-data-source")
        sources = [plugin]
        for m, ex in enumerate(src.extractors):
            e = _lookup(ex.pluginRef, f"{where}.extractors[{m}]", plugins)
            if not isinstance(e, CoreMetricsExtractor):
                raise config_error(f"{where}.extractors[{m}].pluginRef: expected a core-metrics-extractor")
            extractors = [e]
    if sources:
        cfg.metrics_scheme, cfg.metrics_path = sources[0].scheme, sources[0].path
        cfg.metrics_insecure = sources[0].insecure_skip_verify
    if extractors:
        cfg.default_engine = extractors[0].default_engine


def _detector(spec: EndpointPickerConfig, plugins: Mapping[str, object], source: str) -> SaturationDetector:
    """The saturation detector: ``flowControl.saturationDetector`` (also used with the gate off, as in the
    reference), else the deprecated top-level ``saturationDetector``, else a defined detector plugin, else
    a default ``utilization-detector``."""
    fc = spec.flowControl or {}
    where, ref = f"{source}: flowControl.saturationDetector", fc.get("saturationDetector")
    if ref is None and spec.saturationDetector is not None:
        where, ref = f"{source}: saturationDetector", {"pluginRef": spec.saturationDetector.pluginRef}
    if ref is not None:
        if not isinstance(ref, Mapping):
            raise config_error(f"{where}: expected a mapping, got {ref!r}")
        name = ref.get("pluginRef")
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


def _flow_control(cfg: PickerConfig, source: str) -> None:
    """The one hook for flow control: its raw section goes to its own parser when the gate is on."""
    if gate_enabled(cfg.feature_gates):
        cfg.flow = parse_flow_control(cfg.flow_control, cfg.plugins, f"{source}: flowControl")
        cfg.saturation = cfg.flow.detector
    elif cfg.flow_control:
        log.warning("%s: flowControl is ignored (featureGates does not enable flowControl)", source)


KNOWN_GATES = ("flowControl", "haPopulateNonLeaderDatastore")
"""The reference picker's feature gates (inferoute acts on ``flowControl``; a standby always keeps its
datastore)."""


def _check_gates(gates: list[str], source: str) -> None:
    """``name``, ``name=true`` or ``name=false``; a misspelt known gate is an error (it would silently stay
    off), another unknown one a warning (configs written for other pickers may carry their own gates)."""
    for i, gate in enumerate(gates):
        name, eq, value = gate.partition("=")
        where = f"{source}: featureGates[{i}]"
        if eq and value.strip().lower() not in ("true", "false"):
            raise config_error(f"{where}: {gate!r}: the value after '=' must be true or false")
        if name.strip() in KNOWN_GATES:
            continue
        close = difflib.get_close_matches(name.strip(), KNOWN_GATES, n=1, cutoff=0.8)
        if close:
            raise config_error(f"{where}: unknown gate {name.strip()!r}; did you mean {close[0]!r}?")
        log.warning("%s: unknown gate %r ignored; known: %s", where, name.strip(), ", ".join(KNOWN_GATES))


def _check_parser(spec: EndpointPickerConfig, plugins: Mapping[str, object], source: str) -> None:
    """``parser.pluginRef``: a declared plugin or the one parser type there is (nothing else is used)."""
    if spec.parser is None:
        return
    ref = spec.parser.pluginRef
    if ref not in plugins and ref != "openai-parser":
        raise config_error(
            f"{source}: parser.pluginRef: {ref!r} is neither a defined plugin nor openai-parser; "
            f"defined: {', '.join(plugins) or '(none)'}"
        )


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
    spec = load_document(text, source)
    _check_gates(spec.featureGates, source)
    plugins = _plugins(spec, registry, deps, source)
    _check_parser(spec, plugins, source)
    cfg = PickerConfig(
        _scheduler(spec, plugins, registry, deps, observer, source),
        _prefix_settings(plugins),
        feature_gates=tuple(spec.featureGates),
        flow_control=spec.flowControl,
        plugins=plugins,
        source=source,
    )
    _data_layer(cfg, spec, plugins)
    cfg.saturation = _detector(spec, plugins, source)
    load_objectives(cfg.store, spec.objectives, f"{source}: objectives")
    load_rewrites(cfg.store, spec.modelRewrites, f"{source}: modelRewrites")
    _flow_control(cfg, source)
    cfg.admitters = [p for p in plugins.values() if isinstance(p, LatencySloAdmitter)]
    return cfg
