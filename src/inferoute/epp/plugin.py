"""Plugin contracts: what every plugin factory receives (:class:`Params`, :class:`PluginDeps`) and returns.

Plugins import this module, never the registry, so the registry can import every plugin without a cycle.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from inferoute.clock import Clock
from inferoute.endpoints import Endpoint
from inferoute.epp.learned import LearnedState
from inferoute.errors import ConfigError


def config_error(message: str) -> ConfigError:
    """The error for a configuration mistake; ``message`` starts with the key path (``plugins[0].type:``)."""
    return ConfigError(message)


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
        v = self.optional_int(key, minimum=minimum, maximum=maximum)
        return default if v is None else v

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

    def section(self, key: str) -> Params:
        """A nested mapping parameter as its own :class:`Params` (call its :meth:`done` too)."""
        return Params(self._get(key), f"{self.where}.{key}")

    def optional_int(self, key: str, *, minimum: int | None = None, maximum: int | None = None) -> int | None:
        v = self._get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raise config_error(f"{self.where}.{key}: expected an integer, got {v!r}")
        self._range(key, v, minimum, maximum)
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


@runtime_checkable
class BackgroundPlugin(Protocol):
    """A plugin with work of its own (e.g. KV-event subscribers): the picker starts it with the endpoint
    set, tells it every change of that set, and closes it."""

    async def start(self, endpoints: Sequence[Endpoint]) -> None: ...

    def endpoints_changed(self, endpoints: Sequence[Endpoint]) -> None: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class RequestPreparer(Protocol):
    """A plugin that computes request data before scheduling, with I/O (llm-d's data producers, e.g.
    ``token-producer``): the token ids of the prompt, or None."""

    async def prepare(self, body: bytes, endpoints: Sequence[Endpoint]) -> Sequence[int] | None: ...


@runtime_checkable
class PluginBinder(Protocol):
    """A plugin that refers to other plugins by name: called once every plugin of the config exists."""

    def bind(self, plugins: Mapping[str, object]) -> None: ...


@dataclass(slots=True)
class NoParams:
    """A config plugin accepted for compatibility that takes no parameters."""

    name: str
    kind: str = ""


def no_params(kind: str) -> Factory:
    """A factory for a parameterless config plugin of type ``kind``."""

    def create(name: str, p: Params, deps: PluginDeps) -> NoParams:
        return NoParams(name, kind)

    return create
