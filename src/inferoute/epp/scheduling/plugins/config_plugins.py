"""Scheduling config plugins with no per-request role.

* ``approx-prefix-cache-producer``: ``autoTune``, ``blockSizeTokens``, ``maxPrefixBlocksToMatch``,
  ``maxPrefixTokensToMatch``, ``lruCapacityPerServer`` — the settings of the learned prefix index.
* ``single-profile-handler``: no parameters (the default handler; the multi-profile ones are in
  :mod:`inferoute.epp.scheduling.handlers`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from inferoute.epp.plugin import Factory, Params, PluginDeps
from inferoute.epp.scheduling.framework import SingleProfileHandler
from inferoute.epp.scheduling.plugins.prefix_cache_scorer import read_prefix_settings
from inferoute.epp.scheduling.types import PrefixSettings


@dataclass(slots=True)
class PrefixProducer:
    type_name: ClassVar[str] = "approx-prefix-cache-producer"
    name: str
    settings: PrefixSettings


def _producer(name: str, p: Params, deps: PluginDeps) -> PrefixProducer:
    return PrefixProducer(name, read_prefix_settings(p) or PrefixSettings())


def _single(name: str, p: Params, deps: PluginDeps) -> SingleProfileHandler:
    p.done()
    return SingleProfileHandler(name)


FACTORIES: dict[str, Factory] = {
    "approx-prefix-cache-producer": _producer,
    "single-profile-handler": _single,
}
