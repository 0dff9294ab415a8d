"""Shared helper of the pickers that return up to ``maxNumOfEndpoints`` candidates (the chosen one, then
ordered fallbacks)."""

from __future__ import annotations

from typing import ClassVar

from inferoute.epp.plugin import Params


class BoundedPicker:
    """Base of a picker keeping its config name and ``max_endpoints``, the most candidates it returns."""

    type_name: ClassVar[str]

    def __init__(self, name: str, max_endpoints: int = 1) -> None:
        self.name = name
        self.max_endpoints = max_endpoints


def max_endpoints(params: Params) -> int:
    """The ``maxNumOfEndpoints`` parameter: an integer, at least 1, default 1."""
    return params.integer("maxNumOfEndpoints", 1, minimum=1)
