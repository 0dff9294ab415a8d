"""EndpointPickerConfig loading: the GIE default, built-in profiles, and errors that name the bad key."""

from __future__ import annotations

import pytest

from inferoute.clock import FakeClock
from inferoute.epp.config import BUILTIN_PROFILES, builtin_profile_text, parse_config
from inferoute.epp.learned import LocalLearnedState
from inferoute.epp.plugin import PluginDeps
from inferoute.errors import InferouteError

DEPS = PluginDeps(LocalLearnedState(), FakeClock(), 1)


def load(text: str | None):  # type: ignore[no-untyped-def]
    return parse_config(text, deps=DEPS)


def config_error(text: str) -> str:
    with pytest.raises(InferouteError) as e:
        load(text)
    assert e.value.cause == "config"
    return e.value.message


def test_default_equals_the_gie_default() -> None:
    cfg = load(None)
    profile = cfg.scheduler.primary
    assert [(s.scorer.type_name, s.weight) for s in profile.scorers] == [
        ("queue-scorer", 2.0),
        ("kv-cache-utilization-scorer", 2.0),
        ("prefix-cache-scorer", 3.0),
    ]
    assert profile.picker.type_name == "max-score-picker"
    assert cfg.prefix.block_size_tokens == 16 and cfg.prefix.max_blocks == 256 and cfg.prefix.auto_tune
    assert (cfg.metrics_path, cfg.default_engine) == ("/metrics", "vllm")


@pytest.mark.parametrize("name", BUILTIN_PROFILES)
def test_builtin_profiles_load(name: str) -> None:
    assert load(builtin_profile_text(name)).scheduler.primary.picker is not None


def test_gie_reference_example_loads() -> None:
    cfg = load("""
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
featureGates: ["flowControl"]
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: lora-affinity-scorer
- type: approx-prefix-cache-producer
  parameters: {autoTune: false, blockSizeTokens: 32, maxPrefixBlocksToMatch: 128, lruCapacityPerServer: 1000}
- type: prefix-cache-scorer
- type: max-score-picker
  parameters: {maxNumOfEndpoints: 2}
- type: metrics-data-source
  parameters: {scheme: http, path: /custom-metrics, insecureSkipVerify: true}
- type: core-metrics-extractor
  parameters: {defaultEngine: sglang}
- type: utilization-detector
  parameters: {queueDepthThreshold: 7, kvCacheUtilThreshold: 0.9, headroom: 0.0}
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: queue-scorer, weight: 2}
  - {pluginRef: kv-cache-utilization-scorer, weight: 2}
  - {pluginRef: prefix-cache-scorer, weight: 3}
  - {pluginRef: lora-affinity-scorer}
  - {pluginRef: max-score-picker}
saturationDetector: {pluginRef: utilization-detector}
dataLayer:
  sources:
  - pluginRef: metrics-data-source
    extractors: [{pluginRef: core-metrics-extractor}]
flowControl: {maxBytes: 10Gi}
""")
    p = cfg.scheduler.primary
    assert [s.weight for s in p.scorers] == [2.0, 2.0, 3.0, 1.0]  # missing weight → 1, as GIE
    assert p.picker.max_endpoints == 2
    assert (cfg.prefix.block_size_tokens, cfg.prefix.max_blocks, cfg.prefix.auto_tune) == (32, 128, False)
    assert cfg.prefix.lru_capacity == 1000
    assert (cfg.metrics_path, cfg.default_engine) == ("/custom-metrics", "sglang")
    assert cfg.feature_gates == ("flowControl",)


def test_profiles_default_to_every_scheduling_plugin() -> None:
    cfg = load("plugins: [{type: queue-scorer}, {type: random-picker}]")
    assert [s.scorer.type_name for s in cfg.scheduler.primary.scorers] == ["queue-scorer"]
    assert cfg.scheduler.primary.picker.type_name == "random-picker"


def test_unknown_plugin_type_lists_valid_types() -> None:
    msg = config_error("plugins: [{type: queue-scorrer}]")
    assert msg.startswith("config: plugins[0].type: unknown plugin type 'queue-scorrer'; valid: "), msg
    assert "queue-scorer" in msg and "max-score-picker" in msg and "predicted-ttft-scorer" in msg


def test_unknown_parameter_lists_valid_parameters() -> None:
    msg = config_error("plugins: [{type: max-score-picker, parameters: {maxEndpoints: 2}}]")
    assert msg.startswith("config: plugins[0].parameters: unknown parameter(s) ['maxEndpoints']"), msg
    assert "maxNumOfEndpoints" in msg


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (
            "plugins: [{type: max-score-picker, parameters: {maxNumOfEndpoints: 0}}]",
            "maxNumOfEndpoints: must be >= 1",
        ),
        ("plugins: [{type: max-score-picker, parameters: {maxNumOfEndpoints: two}}]", "expected an integer"),
        ("plugins: [{type: core-metrics-extractor, parameters: {defaultEngine: tgi}}]", "valid: sglang"),
        (
            "plugins: [{type: predicted-ttft-scorer, parameters: {prefillSecondsPerToken: -1}}]",
            "must be >= 0",
        ),
        ("apiVersion: v9\nplugins: []", "apiVersion"),
        ("kind: Deployment", "kind"),
        (
            "plugins: []\nscheduler: {}",
            "config: scheduler: unknown key; valid: apiVersion, kind, featureGates",
        ),
        (
            "plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: d, plugins: [{pluginRef: nope}]}]",
            "'nope' is not a defined plugin",
        ),
        (
            "plugins: [{type: queue-scorer}]\n"
            "schedulingProfiles: [{name: d, plugins: [{pluginRef: queue-scorer, "
            "weight: -2}]}]",
            "weight: expected a positive number",
        ),
        (
            "plugins: [{type: random-picker}]\n"
            "schedulingProfiles: [{name: d, plugins: [{pluginRef: random-picker, "
            "weight: 2}]}]",
            "only scorers take a weight",
        ),
        (
            "plugins: [{type: metrics-data-source}]\nschedulingProfiles: [{name: d, plugins: "
            "[{pluginRef: metrics-data-source}]}]",
            "not a filter, scorer or picker",
        ),
        ("plugins: [{type: queue-scorer}, {type: queue-scorer}]", "duplicate plugin name"),
        (
            "plugins: [{type: random-picker}, {type: max-score-picker}]\n"
            "schedulingProfiles: [{name: d, plugins: "
            "[{pluginRef: random-picker}, {pluginRef: max-score-picker}]}]",
            "already has picker",
        ),
        ("schedulingProfiles: [{name: a}, {name: b}]", "exactly one live profile"),
        (
            "plugins: [{type: queue-scorer, parameters: [1]}]",
            "config: plugins[0].parameters: expected a mapping, got a list",
        ),
        ("plugins: {type: queue-scorer}", "config: plugins: expected a list, got a mapping"),
        (
            "plugins: [{type: queue-scorer, typo: 1}]",
            "plugins[0].typo: unknown key; valid: type, name, parameters",
        ),
        ("plugins: [{name: x}]", "config: plugins[0].type: required"),
        (
            "apiVersion: v9",
            "config: apiVersion: 'v9' is not supported; valid: inference.networking.x-k8s.io/v1alpha1",
        ),
        ("featureGates: [1]", "config: featureGates[0]: expected a string, got an integer"),
        (
            "plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: d, plugins: "
            "[{pluginRef: queue-scorer, weight: true}]}]",
            "config: schedulingProfiles[0].plugins[0].weight: expected a number, got true or false",
        ),
        (
            "schedulingProfiles: [{name: ''}]",
            "config: schedulingProfiles[0].name: expected a string of length >= 1",
        ),
        (
            "dataLayer: {sources: [{pluginRef: x, extractor: []}]}",
            "dataLayer.sources[0].extractor: unknown key",
        ),
        ("plugins: [{type: queue-scorer}\n", "invalid YAML"),
        # found walking every key: these were accepted and then silently ignored
        ("featureGates: [flowcontrol]", "config: featureGates[0]: unknown gate 'flowcontrol'; did you mean"),
        ("featureGates: [flowControl=on]", "config: featureGates[0]: 'flowControl=on': the value after '='"),
        ("parser: {pluginRef: json}", "config: parser.pluginRef: 'json' is neither a defined plugin nor"),
        (
            "plugins: [{type: metrics-data-source, parameters: {path: metrics}}]",
            "config: plugins[0].parameters.path: must start with '/'",
        ),
    ],
)
def test_bad_configs_name_the_key(text: str, fragment: str) -> None:
    assert fragment in config_error(text)


def test_gates_the_picker_does_not_know_are_warned_about_not_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    load(
        "featureGates: [haPopulateNonLeaderDatastore, someOtherPickersGate]\n"
        "parser: {pluginRef: openai-parser}"
    )
    assert "unknown gate 'someOtherPickersGate' ignored" in caplog.text


def test_unknown_builtin_profile() -> None:
    with pytest.raises(InferouteError, match="valid: gie-default"):
        builtin_profile_text("fastest")
