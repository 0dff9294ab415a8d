"""Plugin registry: GIE kebab-case type name → factory, plus typed parameter reading with clear errors.

Nothing registers itself on import; :func:`register_builtins` lists every built-in plugin explicitly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from inferoute.clock import Clock
from inferoute.epp.learned import LearnedState
from inferoute.errors import InferouteError


def config_error(message: str) -> InferouteError:
    return InferouteError(500, message, cause="config")


class Params:
    """Reads a plugin's ``parameters`` mapping; every getter names the key on error; :meth:`done` rejects
    unknown keys and lists the valid ones."""

    def __init__(self, raw: Any, where: str) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise config_error(f"{where}: parameters must be a mapping")
        self.raw: Mapping[str, Any] = raw
        self.where = where
        self._known: list[str] = []

    def _get(self, key: str) -> Any:
        self._known.append(key)
        return self.raw.get(key)

    def integer(
        self, key: str, default: int, *, minimum: int | None = None, maximum: int | None = None
    ) -> int:
        v = self._get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int):
            raise config_error(f"{self.where}.{key}: expected an integer, got {v!r}")
        self._range(key, v, minimum, maximum)
        return v

    def number(
        self, key: str, default: float, *, minimum: float | None = None, maximum: float | None = None
    ) -> float:
        v = self._get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise config_error(f"{self.where}.{key}: expected a number, got {v!r}")
        self._range(key, v, minimum, maximum)
        return float(v)

    def flag(self, key: str, default: bool) -> bool:
        v = self._get(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise config_error(f"{self.where}.{key}: expected true or false, got {v!r}")
        return v

    def text(self, key: str, default: str, *, choices: tuple[str, ...] | None = None) -> str:
        v = self._get(key)
        if v is None:
            return default
        if not isinstance(v, str):
            raise config_error(f"{self.where}.{key}: expected a string, got {v!r}")
        if choices is not None and v not in choices:
            raise config_error(f"{self.where}.{key}: {v!r} is not valid; valid: {', '.join(choices)}")
        return v

    def _range(self, key: str, v: float, minimum: float | None, maximum: float | None) -> None:
        if minimum is not None and v < minimum:
            raise config_error(f"{self.where}.{key}: must be >= {minimum}, got {v}")
        if maximum is not None and v > maximum:
            raise config_error(f"{self.where}.{key}: must be <= {maximum}, got {v}")

    def done(self) -> None:
        """Reject parameters no getter asked for."""
        unknown = sorted(set(self.raw) - set(self._known))
        if unknown:
            valid = ", ".join(sorted(set(self._known))) or "(none)"
            raise config_error(f"{self.where}: unknown parameter(s) {unknown}; valid: {valid}")


@dataclass(frozen=True, slots=True)
class PluginDeps:
    """What factories may use: shared learned state, the clock and a seeded RNG."""

    learned: LearnedState
    clock: Clock
    seed: int | None = None


Factory = Callable[[str, Params, PluginDeps], object]


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
        plugin = self.spec(type_name, params.where).factory(name, params, deps)
        params.done()
        return plugin


def register_builtins(registry: PluginRegistry) -> PluginRegistry:
    """Register every built-in plugin under its GIE type name (and inferoute's own ones)."""
    from inferoute.epp.scheduling.plugins import (
        kv_cache_scorer,
        lora_affinity_scorer,
        max_score_picker,
        passive,
        predicted_ttft_scorer,
        prefix_cache_scorer,
        queue_scorer,
        random_picker,
        round_robin_picker,
        running_requests_scorer,
        session_affinity_scorer,
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
    ):
        registry.register(module.TYPE, module.create, module.ROLE)
    for type_name, factory in passive.FACTORIES.items():
        registry.register(type_name, factory, "other")
    return registry


def builtin_registry() -> PluginRegistry:
    return register_builtins(PluginRegistry())
