"""Weighted backends of one route: a Gateway API rule whose ``backendRefs`` name several InferencePools.

Each backend is a complete :class:`~inferoute.gateway.routing.RequestRouter` (its own picker, its own pool as
the allow-list and fail-open targets). :class:`WeightedRouter` chooses one per request by *smooth weighted
round robin* (the NGINX upstream algorithm): over any window of ``sum(weights)`` requests each backend gets
exactly its share, interleaved rather than in bursts, so a 70/30 split is 70/30 after ten requests instead
of "on average". The choice is pure and deterministic; nothing here touches a socket.

Why the whole request goes to one backend's picker rather than asking every picker: the Gateway API splits
*requests* by backend weight, and each InferencePool's picker only knows its own pods.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from inferoute.gateway.config import RouteConfig
from inferoute.gateway.routing import RoutedRequest


class Router(Protocol):
    """What a data plane asks to route a request of one route: a
    :class:`~inferoute.gateway.routing.RequestRouter` (one pool) or a :class:`WeightedRouter` (weighted
    pools)."""

    @property
    def route(self) -> RouteConfig: ...

    async def decide(
        self,
        method: str,
        path: str,
        headers: Iterable[tuple[str, str]],
        body: bytes,
        request_id: str = "",
    ) -> RoutedRequest: ...


class SmoothWeighted:
    """Smooth weighted round robin over indexes ``0..len(weights)-1`` (weights >= 0, at least one > 0)."""

    __slots__ = ("_current", "_total", "_weights")

    def __init__(self, weights: Sequence[int]) -> None:
        if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
            raise ValueError("weights must be >= 0 with at least one > 0")
        self._weights = tuple(weights)
        self._total = sum(weights)
        self._current = [0] * len(weights)

    def next(self) -> int:
        """The next index: every weight is added to its running score, the highest score wins and pays
        back the total."""
        cur = self._current
        best = -1
        for i, w in enumerate(self._weights):
            cur[i] += w
            if w > 0 and (best < 0 or cur[i] > cur[best]):
                best = i
        cur[best] -= self._total
        return best


class WeightedRouter:
    """One route with weighted backends; :meth:`decide` delegates to the backend chosen for the request."""

    def __init__(self, route: RouteConfig, backends: Sequence[tuple[int, Router]]) -> None:
        self._route = route
        self.backends = tuple(d for _, d in backends)
        self._choose = SmoothWeighted([w for w, _ in backends])

    @property
    def route(self) -> RouteConfig:
        return self._route

    async def decide(
        self,
        method: str,
        path: str,
        headers: Iterable[tuple[str, str]],
        body: bytes,
        request_id: str = "",
    ) -> RoutedRequest:
        backend = self.backends[self._choose.next()]
        return await backend.decide(method, path, headers, body, request_id)


__all__ = ["Router", "SmoothWeighted", "WeightedRouter"]
