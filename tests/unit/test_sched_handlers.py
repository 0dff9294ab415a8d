"""Several live scheduling profiles per config: the disagg (P/D) profile handler, its deciders and the role
filters, through a real director (FakeClock, hand-fed metrics, no sockets)."""

from __future__ import annotations

import pytest
from test_epp_rig import Rig, body, pick_request

from inferoute.endpoints import Endpoint
from inferoute.epp.scheduling.handlers import PREFILLER_HEADER
from inferoute.errors import InferouteError
from inferoute.picking import Destination

PD = """
plugins:
- type: prefill-filter
- type: decode-filter
- type: queue-scorer
- type: prefix-cache-scorer
- {type: prefix-based-pd-decider, parameters: {nonCachedTokens: 16}}
- type: disagg-profile-handler
  parameters:
    profiles: {decode: dec, prefill: pre}
    deciders: {prefill: prefix-based-pd-decider}
schedulingProfiles:
- name: dec
  plugins:
  - {pluginRef: decode-filter}
  - {pluginRef: queue-scorer}
  - {pluginRef: prefix-cache-scorer, weight: 3}
- name: pre
  plugins: [{pluginRef: prefill-filter}, {pluginRef: queue-scorer}]
"""

PREFILL = {"10.0.0.1:8000", "10.0.0.2:8000"}
DECODE = {"10.0.0.3:8000", "10.0.0.4:8000", "10.0.0.5:8000"}


def pd_rig(config: str = PD) -> Rig:
    rig = Rig(0, config)
    roles = ["prefill", "prefill", "decode", "decode", ""]  # unlabelled counts as decode
    eps = [
        Endpoint(f"pod-{i}", f"10.0.0.{i + 1}", 8000, {"llm-d.ai/role": r} if r else {})
        for i, r in enumerate(roles)
    ]
    rig.datastore.set_endpoints(eps)
    for ep in eps:
        rig.scrape(ep.key)
    return rig


def decide(rig: Rig, prompt: str, headers: dict[str, str] | None = None) -> Destination:
    d, s = rig.director.decide(pick_request(body(prompt=prompt), headers=headers))
    assert isinstance(d, Destination), d
    s.response_finished()
    return d


def test_long_uncached_prompt_goes_to_decode_with_a_prefill_pod_named() -> None:
    rig = pd_rig()
    long = "a long document that no pod has seen yet. " * 40
    d = decide(rig, long)
    assert d.endpoints[0] in DECODE
    assert d.set_headers[PREFILLER_HEADER] in PREFILL
    # the same prompt again: the decode pod now holds its prefix, so it prefills itself
    again = decide(rig, long)
    assert again.endpoints[0] == d.endpoints[0]
    assert PREFILLER_HEADER not in again.set_headers
    # a short prompt is never worth disaggregating
    assert PREFILLER_HEADER not in decide(rig, "hi").set_headers


def test_a_client_sent_prefiller_header_is_cleared() -> None:
    rig = pd_rig()
    d = decide(rig, "hi", {PREFILLER_HEADER: "169.254.169.254:80"})
    assert d.set_headers[PREFILLER_HEADER] == ""


def test_legacy_pd_profile_handler_and_always_decider() -> None:
    legacy = """
plugins:
- type: prefill-filter
- type: decode-filter
- {type: always-disagg-pd-decider, name: always}
- type: pd-profile-handler
  parameters: {decodeProfile: decode, prefillProfile: prefill, deciderPluginName: always, primaryPort: 8000}
schedulingProfiles:
- {name: decode, plugins: [{pluginRef: decode-filter}]}
- {name: prefill, plugins: [{pluginRef: prefill-filter}]}
"""
    rig = pd_rig(legacy)
    for _ in range(5):
        d = decide(rig, "hi")
        assert d.endpoints[0] in DECODE and d.set_headers[PREFILLER_HEADER] in PREFILL


def test_prefill_first_runs_the_prefill_profile_on_every_request() -> None:
    cfg = PD.replace(
        "    deciders: {prefill: prefix-based-pd-decider}\n",
        "    deciders: {prefill: prefix-based-pd-decider}\n    stageOrder: prefill-first\n",
    )
    rig = pd_rig(cfg)
    ctx_results = []
    sched = rig.director.scheduler
    orig = sched.schedule

    def spy(ctx, cands):  # type: ignore[no-untyped-def]
        r = orig(ctx, cands)
        ctx_results.append(r)
        return r

    sched.schedule = spy  # type: ignore[method-assign]
    decide(rig, "hi")
    assert set(ctx_results[0].others) == {"pre"}  # ran, though the decider kept the request on decode
    assert PREFILLER_HEADER not in ctx_results[0].headers


def test_without_prefill_endpoints_the_decode_pod_does_it_all() -> None:
    rig = pd_rig()
    decode_only = [e for e in rig.datastore.states.values() if e.key not in PREFILL]
    rig.datastore.set_endpoints([s.endpoint for s in decode_only])
    d = decide(rig, "a long document that no pod has seen yet. " * 40)
    assert d.endpoints[0] in DECODE and PREFILLER_HEADER not in d.set_headers


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (PD.replace("- name: pre\n", "- name: other\n"), "no live scheduling profile named pre"),
        (PD + "- {name: third, plugins: [{pluginRef: queue-scorer}]}\n", "third are not one of its stages"),
        (
            PD.replace("- type: queue-scorer\n", "- type: queue-scorer\n- type: single-profile-handler\n"),
            "one profile handler per config",
        ),
        (
            PD.replace("deciders: {prefill: prefix-based-pd-decider}", "deciders: {prefill: queue-scorer}"),
            "is not a defined decider plugin",
        ),
        (
            PD.replace("profiles: {decode: dec, prefill: pre}", "profiles: {decode: dec, prefil: pre}"),
            "unknown parameter(s) ['prefil']",
        ),
        (
            PD.replace("    deciders: {prefill: prefix-based-pd-decider}\n", "    stageOrder: sideways\n"),
            "stageOrder: 'sideways' is not valid",
        ),
    ],
)
def test_config_mistakes_name_the_key(text: str, fragment: str) -> None:
    with pytest.raises(InferouteError) as e:
        Rig(0, text)
    assert e.value.cause == "config"
    assert fragment in e.value.message


def test_without_a_decider_only_the_decode_profile_runs() -> None:
    cfg = PD.replace("    deciders: {prefill: prefix-based-pd-decider}\n", "")
    rig = pd_rig(cfg)
    d = decide(rig, "a long document that no pod has seen yet. " * 40)
    assert d.endpoints[0] in DECODE and PREFILLER_HEADER not in d.set_headers
