"""Model-server endpoints: what a pool is made of.

The same shape is used by the gateway's ``pool:`` section and the picker's static endpoints file::

    endpoints:
      - {name: pod-0, address: 10.0.0.7, port: 8000, labels: {inference.networking.k8s.io/engine-type: vllm}}
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from inferoute.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One model-server replica (one data-parallel rank = one port)."""

    name: str
    address: str
    port: int
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """``ip:port`` as used on the Endpoint Picker Protocol wire (``[v6]:port`` for IPv6)."""
        return hostport(self.address, self.port)


def hostport(address: str, port: int) -> str:
    if ":" in address and not address.startswith("["):
        return f"[{address}]:{port}"
    return f"{address}:{port}"


def split_hostport(value: str) -> tuple[str, int | None]:
    """Split ``ip``, ``ip:port``, ``[v6]`` or ``[v6]:port``; the port is None when absent. A port that is not
    a number raises ValueError."""
    value = value.strip()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        return host, (_port(rest[1:], value) if rest.startswith(":") and rest[1:] else None)
    if value.count(":") == 1:
        host, _, port = value.partition(":")
        return host, _port(port, value)
    return value, None


def _port(text: str, value: str) -> int:
    if not text.isdigit():
        raise ValueError(f"the port of {value!r} is not a number")
    return int(text)


def parse_endpoints(raw: Any, where: str = "endpoints") -> list[Endpoint]:
    """Validate a list of ``{name, address, port, labels}`` mappings into endpoints.

    Raises :class:`InferouteError` (status 500, cause ``config``) naming the bad key.
    """
    if raw is None:
        return []
    if not isinstance(raw, Sequence) or isinstance(raw, str | bytes):
        raise ConfigError(f"{where}: expected a list of endpoints")
    out: list[Endpoint] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(item, Mapping):
            raise ConfigError(f"{at}: expected a mapping with name, address, port")
        unknown = set(item) - {"name", "address", "port", "labels", "namespace"}
        if unknown:
            raise ConfigError(
                f"{at}: unknown key(s) {sorted(unknown)}; valid: name, address, port, labels, namespace"
            )
        address = item.get("address")
        port = item.get("port")
        if not isinstance(address, str) or not address:
            raise ConfigError(f"{at}.address: required string")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise ConfigError(f"{at}.port: required integer 1-65535")
        name = item.get("name") or hostport(address, port)
        labels = item.get("labels") or {}
        if not isinstance(labels, Mapping):
            raise ConfigError(f"{at}.labels: expected a mapping")
        ep = Endpoint(str(name), address, port, {str(k): str(v) for k, v in labels.items()})
        if ep.key in seen:
            raise ConfigError(f"{at}: duplicate endpoint {ep.key}")
        seen.add(ep.key)
        out.append(ep)
    return out


def is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True
