"""Profile handlers that run more than one live profile, their deciders and the role filters.

* ``disagg-profile-handler`` (``pd-profile-handler`` is the reference's deprecated alias): prefill/decode
  disaggregation. Parameters: ``profiles: {decode, prefill}`` (profile names, default ``decode`` and
  ``prefill``), ``deciders: {prefill: <decider plugin name>}`` (the prefill stage is enabled only with a
  decider), ``stageOrder: decode-first`` (default: the decode pod is picked first and the decider looks at its
  cache) or ``prefill-first`` (the prefill profile always runs first). The legacy ``pd-profile-handler``
  parameters ``decodeProfile``, ``prefillProfile`` and ``deciderPluginName`` are read too
  (``prefixPluginType``, ``prefixPluginName`` and ``primaryPort`` are accepted and ignored). The decode
  pick is the request's destination; when the decider disaggregates, the prefill pick goes in the
  ``x-prefiller-host-port`` request header (a client-sent one is cleared) for the decode pod's sidecar.
* deciders: ``always-disagg-pd-decider``; ``prefix-based-pd-decider`` (``nonCachedTokens``: disaggregate when
  the prompt tokens the decode pod probably lacks are at least this many, 0 = never; ``promptTokens``: and the
  prompt has at least this many tokens, 0 = no gate).
* filters: ``prefill-filter`` keeps endpoints whose ``llm-d.ai/role`` label has a prefill stage
  (``prefill``, ``prefill-decode``, ``encode-prefill``, ...); ``decode-filter`` keeps those with a decode
  stage, unlabelled endpoints and the deprecated ``both``.

The prefill pick is not counted in flight (the data plane reports the decode pod's response only).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import ClassVar, Protocol, runtime_checkable

from inferoute.epp.plugin import Factory, Params, PluginDeps, config_error
from inferoute.epp.scheduling.framework import NoEndpoints, ProfileResult, SchedulerProfile
from inferoute.epp.scheduling.types import Candidate, CycleContext, uncached_tokens

PREFILLER_HEADER = "x-prefiller-host-port"
ROLE_LABEL = "llm-d.ai/role"


@runtime_checkable
class PdDecider(Protocol):
    type_name: ClassVar[str]
    name: str

    def disaggregate(self, ctx: CycleContext, decode: Candidate) -> bool: ...


@dataclass(slots=True)
class AlwaysDisagg:
    type_name: ClassVar[str] = "always-disagg-pd-decider"
    name: str

    def disaggregate(self, ctx: CycleContext, decode: Candidate) -> bool:
        return True


@dataclass(slots=True)
class PrefixBasedDecider:
    type_name: ClassVar[str] = "prefix-based-pd-decider"
    name: str
    non_cached_tokens: int = 0
    prompt_tokens: int = 0

    def disaggregate(self, ctx: CycleContext, decode: Candidate) -> bool:
        if self.non_cached_tokens <= 0:
            return False
        if self.prompt_tokens and ctx.request.prompt_tokens < self.prompt_tokens:
            return False
        return uncached_tokens(ctx, decode.key) >= self.non_cached_tokens


def _stages(c: Candidate) -> frozenset[str]:
    role = c.labels.get(ROLE_LABEL, "")
    if not role or role == "both":
        return frozenset(("prefill", "decode")) if role else frozenset(("decode",))
    return frozenset(role.split("-"))


@dataclass(slots=True)
class _StageFilter:
    """Endpoints whose ``llm-d.ai/role`` has the :attr:`stage` (see module docstring)."""

    type_name: ClassVar[str]
    stage: ClassVar[str]
    name: str

    def filter(self, ctx: CycleContext, candidates: list[Candidate]) -> list[Candidate]:
        return [c for c in candidates if self.stage in _stages(c)]


class PrefillFilter(_StageFilter):
    """``prefill-filter``: endpoints with a prefill stage."""

    type_name: ClassVar[str] = "prefill-filter"
    stage: ClassVar[str] = "prefill"


class DecodeFilter(_StageFilter):
    """``decode-filter``: endpoints with a decode stage, unlabelled ones included."""

    type_name: ClassVar[str] = "decode-filter"
    stage: ClassVar[str] = "decode"


class DisaggProfileHandler:
    """``disagg-profile-handler`` (see module docstring)."""

    type_name: ClassVar[str] = "disagg-profile-handler"

    def __init__(
        self,
        name: str,
        decode: str,
        prefill: str,
        decider: str | None,
        prefill_first: bool,
        where: str,
    ) -> None:
        self.name = name
        self.decode = decode
        self.prefill = prefill
        self.decider_name = decider
        self.decider: PdDecider | None = None
        self.prefill_first = prefill_first
        self.where = where

    def bind(self, plugins: Mapping[str, object]) -> None:
        if self.decider_name is None:
            return
        plugin = plugins.get(self.decider_name)
        if not isinstance(plugin, PdDecider):
            raise config_error(
                f"{self.where}: decider {self.decider_name!r} is not a defined decider plugin (types: "
                "always-disagg-pd-decider, prefix-based-pd-decider)"
            )
        self.decider = plugin

    def check(self, live: Sequence[str]) -> None:
        wanted = [self.decode] + ([self.prefill] if self.decider_name is not None else [])
        missing = [n for n in wanted if n not in live]
        if missing:
            raise ValueError(
                f"disagg-profile-handler {self.name}: no live scheduling profile named {', '.join(missing)} "
                f"(profiles: {', '.join(live) or 'none'})"
            )
        extra = sorted(set(live) - {self.decode, self.prefill})
        if extra:
            raise ValueError(
                f"disagg-profile-handler {self.name}: profile(s) {', '.join(extra)} are not one of its "
                f"stages (decode {self.decode!r}, prefill {self.prefill!r}); name them shadow-* to "
                "dark-launch them"
            )

    def run(
        self, profiles: Mapping[str, SchedulerProfile], ctx: CycleContext, candidates: list[Candidate]
    ) -> ProfileResult:
        prefill: ProfileResult | None = None
        if self.prefill_first and self.decider is not None:
            prefill = self._prefill(profiles, ctx, candidates)
        decode = profiles[self.decode].run(ctx, list(candidates))
        if self.decider is None or not self.decider.disaggregate(ctx, decode.endpoints[0]):
            cleared = {PREFILLER_HEADER: ""} if PREFILLER_HEADER in ctx.request.headers else {}
            others = {} if prefill is None else {prefill.profile: prefill}
            return replace(decode, headers=cleared, others=others)
        if prefill is None:
            prefill = self._prefill(profiles, ctx, candidates)
        if prefill is None:  # no prefill endpoint: the decode pod does it all
            return decode
        headers = {PREFILLER_HEADER: prefill.endpoints[0].key}
        return replace(decode, headers=headers, others={prefill.profile: prefill})

    def _prefill(
        self, profiles: Mapping[str, SchedulerProfile], ctx: CycleContext, candidates: list[Candidate]
    ) -> ProfileResult | None:
        try:
            return profiles[self.prefill].run(ctx, list(candidates))
        except NoEndpoints:
            return None


def _disagg(name: str, p: Params, deps: PluginDeps) -> DisaggProfileHandler:
    profiles = p.section("profiles")
    decode = profiles.text("decode", p.text("decodeProfile", "decode"))
    prefill = profiles.text("prefill", p.text("prefillProfile", "prefill"))
    profiles.text("encode", "")  # accepted: the encode stage is not implemented
    profiles.done()
    deciders = p.section("deciders")
    decider = deciders.text("prefill", "")
    deciders.text("encode", "")  # accepted: the encode stage is not implemented
    deciders.done()
    legacy = p.text("deciderPluginName", "")
    for ignored in ("prefixPluginType", "prefixPluginName"):
        p.text(ignored, "")
    p.integer("primaryPort", 0)
    order = p.text("stageOrder", "decode-first", choices=("decode-first", "prefill-first"))
    p.done()
    return DisaggProfileHandler(
        name, decode, prefill, decider or legacy or None, order == "prefill-first", p.where
    )


def _prefix_decider(name: str, p: Params, deps: PluginDeps) -> PrefixBasedDecider:
    d = PrefixBasedDecider(
        name, p.integer("nonCachedTokens", 0, minimum=0), p.integer("promptTokens", 0, minimum=0)
    )
    p.done()
    return d


def _always(name: str, p: Params, deps: PluginDeps) -> AlwaysDisagg:
    p.done()
    return AlwaysDisagg(name)


def _stage_filter(cls: type[_StageFilter]) -> Factory:
    def create(name: str, p: Params, deps: PluginDeps) -> _StageFilter:
        p.done()
        return cls(name)

    return create


FACTORIES: dict[str, Factory] = {
    "disagg-profile-handler": _disagg,
    "pd-profile-handler": _disagg,
    "always-disagg-pd-decider": _always,
    "prefix-based-pd-decider": _prefix_decider,
    "prefill-filter": _stage_filter(PrefillFilter),
    "decode-filter": _stage_filter(DecodeFilter),
}
