"""Plugin registry: GIE kebab-case type name → factory. Plugin contracts live in :mod:`inferoute.epp.plugin`.

Nothing registers itself on import; :func:`register_builtins` lists every built-in plugin explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

from inferoute.epp.plugin import Factory, Params, PluginDeps, config_error


@dataclass(frozen=True, slots=True)
class PluginSpec:
    type_name: str
    factory: Factory
    role: str
    """``filter``, ``scorer``, ``picker`` or ``other`` (accepted config plugins with no scheduling role)."""


class PluginRegistry:
    def __init__(self) -> None:
        self._specs: dict[str, PluginSpec] = {}

    def register(self, type_name: str, factory: Factory, role: str) -> None:
        if type_name in self._specs:
            raise ValueError(f"plugin type {type_name} registered twice")
        self._specs[type_name] = PluginSpec(type_name, factory, role)

    def types(self, role: str | None = None) -> list[str]:
        return sorted(t for t, s in self._specs.items() if role is None or s.role == role)

    def spec(self, type_name: str, where: str) -> PluginSpec:
        spec = self._specs.get(type_name)
        if spec is None:
            raise config_error(
                f"{where}: unknown plugin type {type_name!r}; valid: {', '.join(self.types())}"
            )
        return spec

    def create(self, type_name: str, name: str, params: Params, deps: PluginDeps) -> object:
        # an unknown type is the mistake of the entry's ``type`` key, not of its ``parameters``
        where = params.where.removesuffix(".parameters")
        plugin = self.spec(type_name, f"{where}.type" if where != params.where else where).factory(
            name, params, deps
        )
        params.done()
        return plugin


def register_builtins(registry: PluginRegistry) -> PluginRegistry:
    """Register every built-in plugin under its GIE type name (and inferoute's own ones)."""
    from inferoute.epp.scheduling.plugins import (
        kv_cache_scorer,
        lora_affinity_scorer,
        max_score_picker,
        precise_prefix_producer,
        predicted_ttft_scorer,
        prefix_cache_scorer,
        queue_scorer,
        random_picker,
        round_robin_picker,
        running_requests_scorer,
        session_affinity_scorer,
        token_producer,
        weighted_random_picker,
    )

    for module in (
        queue_scorer,
        kv_cache_scorer,
        running_requests_scorer,
        lora_affinity_scorer,
        prefix_cache_scorer,
        session_affinity_scorer,
        predicted_ttft_scorer,
        max_score_picker,
        random_picker,
        weighted_random_picker,
        round_robin_picker,
        precise_prefix_producer,
        token_producer,
    ):
        registry.register(module.TYPE, module.create, module.ROLE)
    from inferoute.epp.datalayer import plugins as datalayer_plugins
    from inferoute.epp.flowcontrol import plugins as flowcontrol_plugins
    from inferoute.epp.requestcontrol import plugins as requestcontrol_plugins
    from inferoute.epp.scheduling import handlers
    from inferoute.epp.scheduling.plugins import config_plugins

    for module in (datalayer_plugins, flowcontrol_plugins, requestcontrol_plugins, config_plugins, handlers):
        for type_name, factory in module.FACTORIES.items():
            registry.register(type_name, factory, "other")
    return registry


def builtin_registry() -> PluginRegistry:
    return register_builtins(PluginRegistry())


__all__ = [
    "Factory",
    "Params",
    "PluginDeps",
    "PluginRegistry",
    "PluginSpec",
    "builtin_registry",
    "config_error",
]
