"""Status conditions the way Gateway API controllers write them (pure helpers).

A condition keeps its ``lastTransitionTime`` while its ``status`` does not change, so rewriting the same
picture never looks like a transition, and a status that did not change is not written at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from inferoute.controller.model import Obj


def condition(
    type_: str,
    ok: bool,
    reason: str,
    message: str,
    *,
    obj: Obj,
    now: str,
    previous: Iterable[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """One condition of ``obj`` (its ``metadata.generation`` as ``observedGeneration``); the transition time
    is kept from ``previous`` when the condition's status is unchanged."""
    status = "True" if ok else "False"
    since = now
    for old in previous:
        if old.get("type") == type_ and old.get("status") == status and old.get("lastTransitionTime"):
            since = str(old["lastTransitionTime"])
    out: dict[str, Any] = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
    }
    generation = (obj.get("metadata") or {}).get("generation")
    if isinstance(generation, int):
        out["observedGeneration"] = generation
    return out


def current_status(obj: Obj) -> Mapping[str, Any]:
    value = obj.get("status")
    return value if isinstance(value, Mapping) else {}


def previous_conditions(
    entries: Sequence[Mapping[str, Any]], match: Mapping[str, Any], namespace: str
) -> list[Any]:
    """The conditions of the status entry (``parents[]`` item) whose ``parentRef`` equals ``match``
    (``namespace``: the default for refs without one)."""
    want = normal_ref(match, namespace)
    for entry in entries:
        if normal_ref(entry.get("parentRef") or {}, namespace) == want:
            return list(entry.get("conditions") or [])
    return []


def normal_ref(ref: Mapping[str, Any], default_namespace: str = "") -> tuple[str, str, str, str]:
    """(group, kind, namespace, name) of a parentRef with the Gateway API defaults filled in."""
    return (
        str(ref.get("group", "gateway.networking.k8s.io") or "gateway.networking.k8s.io"),
        str(ref.get("kind") or "Gateway"),
        str(ref.get("namespace") or default_namespace),
        str(ref.get("name") or ""),
    )


__all__ = ["condition", "current_status", "normal_ref", "previous_conditions"]
