"""Where the gateway may send a request, and which client headers it must never trust.

Pure code. Two security rules live here:

1. **Strip client-supplied routing headers first.** A client must not choose its own destination
   (the Envoy ORIGINAL_DST pitfall, and the seed module's skip-EPP-if-present hole), nor the model the
   picker serves (:data:`PICKER_CONTROL`, unless its route trusts its clients).
   :func:`routing_header_names` lists them; :func:`strip_headers` removes them.
2. **Only connect to allowed destinations.** :class:`AllowList` accepts an ``ip:port`` only when it is a pool
   endpoint, a configured ``default_upstream``, or an IP inside ``pool.allowed_cidrs``. Anything else a picker
   returns is refused (502, cause ``invalid-destination``), so a confused or compromised picker cannot turn
   the gateway into an open proxy.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from inferoute.endpoints import Endpoint, hostport, split_hostport
from inferoute.epp.requestcontrol.headers import MODEL_REWRITE
from inferoute.errors import InferouteError
from inferoute.picking import DESTINATION_HEADER, MODEL_HEADER

ALWAYS_STRIPPED: frozenset[str] = frozenset({"x-inference-upstream", DESTINATION_HEADER})
PICKER_CONTROL: frozenset[str] = frozenset({*MODEL_REWRITE, MODEL_HEADER})
"""Headers that steer the picker (which model is served, which model it thinks was asked for): stripped
from client requests unless the route sets ``trust_client_headers`` (the gateway's BBR sets the model
header itself)."""
STRIPPED_PREFIX = DESTINATION_HEADER  # x-gateway-destination-endpoint, -served, -subset, ...


def routing_header_names(extra: Iterable[str] = ()) -> frozenset[str]:
    """Lower-case names stripped from every request: the EPP header names in use plus the protocol's own."""
    return ALWAYS_STRIPPED | {h.lower() for h in extra}


def is_routing_header(name_lower: str, names: frozenset[str]) -> bool:
    return name_lower in names or name_lower.startswith(STRIPPED_PREFIX)


def strip_headers(headers: Iterable[tuple[str, str]], names: frozenset[str]) -> list[tuple[str, str]]:
    """The headers without any routing header (case-insensitive); order and duplicates kept."""
    out: list[tuple[str, str]] = []
    for k, v in headers:  # is_routing_header inlined: this runs for every request
        lk = k.lower()
        if lk not in names and not lk.startswith(STRIPPED_PREFIX):
            out.append((k, v))
    return out


def split_destinations(values: Iterable[str]) -> list[str]:
    """Flatten ``["a:1,b:2", "c:3"]`` into ``["a:1", "b:2", "c:3"]`` (the protocol allows comma lists)."""
    out: list[str] = []
    for v in values:
        out.extend(p.strip() for p in v.split(",") if p.strip())
    return out


def invalid_destination(value: str, why: str) -> InferouteError:
    return InferouteError(
        502,
        f"the endpoint picker returned a destination the gateway may not use: {value!r} ({why})",
        cause="invalid-destination",
    )


class AllowList:
    """The set of destinations the gateway may connect to."""

    def __init__(
        self, endpoints: Sequence[Endpoint], cidrs: Sequence[str] = (), extra: Iterable[str] = ()
    ) -> None:
        self._keys: set[str] = {e.key for e in endpoints}
        for value in extra:
            self._keys.add(self.normalize(value))
        self._networks = [ipaddress.ip_network(c, strict=False) for c in cidrs]

    @staticmethod
    def normalize(value: str) -> str:
        host, port = split_hostport(value)
        if not host or port is None or not 0 < port < 65536:
            raise ValueError("expected ip:port")
        return hostport(host, port)

    def check(self, value: str) -> str:
        """The normalized ``ip:port`` if allowed; raises 502 ``invalid-destination`` otherwise."""
        try:
            key = self.normalize(value)
        except ValueError as exc:
            raise invalid_destination(value, str(exc)) from None
        if key in self._keys:
            return key
        host, _ = split_hostport(key)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise invalid_destination(value, "not a pool endpoint and not an IP address") from None
        if any(ip in net for net in self._networks):
            return key
        raise invalid_destination(value, "not a pool endpoint and outside pool.allowed_cidrs")
