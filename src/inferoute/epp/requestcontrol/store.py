"""Objectives and weighted model rewrites: one in-memory store that every source fills.

Two kinds of object, named after the reference's CRDs (``llm-d.ai/v1alpha2``):

* **InferenceObjective** — a name a request selects with the objective header, mapped to a priority (higher
  is more important; negative means *sheddable*: dropped first under saturation). Unknown or absent: 0.
* **InferenceModelRewrite** — ordered ``rules``; a rule's ``matches`` (model names, Exact only) are ORed and
  an empty list matches every model; its ``targets`` are weighted (``weight`` 1..1,000,000, all or none;
  none means equal weights). Precedence when several rules match a model (the reference's):

  1. a rule with an Exact match beats a generic (empty-matches) rule;
  2. then the object created first (``created``: a CRD's ``creationTimestamp``, a YAML entry's position);
  3. then the first rule in the object's list.

Sources own what they put in: each object is upserted and deleted by its ``source`` key (``config/NAME``
for the picker's YAML, ``GROUP/NAMESPACE/NAME`` for a Kubernetes object), so a CRD watcher replacing or
deleting its object never touches what the YAML declared. Sources also have a **rank** (lower wins):
:data:`RANK_CRD` (``llm-d.ai`` objects), :data:`RANK_CRD_DEPRECATED` (``inference.networking.x-k8s.io``),
:data:`RANK_CONFIG` (the picker's YAML and programmatic options, the fallback):

* entries of the same kind and the same **name** (an objective's name; a rewrite object's name): only those
  of the lowest rank count, the others are shadowed until it goes away;
* rewrite rules matching one model: Exact beats generic first, then the lower rank, then ``created``, then
  rule order.

Lookups are dictionary reads kept current on every write (writes are rare, lookups happen on every request).
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from inferoute.epp.plugin import config_error

MAX_WEIGHT = 1_000_000
_T = TypeVar("_T")
RANK_CRD = 0
RANK_CRD_DEPRECATED = 1
RANK_CONFIG = 2


@dataclass(frozen=True, slots=True)
class RewriteTarget:
    model: str
    weight: int = 1


@dataclass(frozen=True, slots=True)
class RewriteRule:
    """``matches`` empty = every model. ``targets`` at least one."""

    matches: tuple[str, ...]
    targets: tuple[RewriteTarget, ...]


@dataclass(frozen=True, slots=True)
class _Choice:
    """A prepared weighted choice: cumulative weights for one bisect per request."""

    models: tuple[str, ...]
    cumulative: tuple[int, ...]

    def pick(self, rng: random.Random) -> str:
        if len(self.models) == 1:
            return self.models[0]
        x = rng.random() * self.cumulative[-1]
        return self.models[bisect.bisect_right(self.cumulative, x)]


@dataclass(slots=True)
class _Rewrite:
    created: float
    rules: tuple[RewriteRule, ...]
    name: str
    rank: int


def _winners(entries: dict[str, _T], name: Callable[[_T], str], rank: Callable[[_T], int]) -> list[_T]:
    """The entries not shadowed by a lower-ranked entry of the same name, in insertion order."""
    best: dict[str, int] = {}
    for e in entries.values():
        best[name(e)] = min(best.get(name(e), rank(e)), rank(e))
    return [e for e in entries.values() if rank(e) == best[name(e)]]


@dataclass(slots=True)
class RequestControlStore:
    """Objectives and model rewrites from every source (see module docstring)."""

    _objectives: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    """source → (objective name, priority, rank)."""
    _rewrites: dict[str, _Rewrite] = field(default_factory=dict)
    _priority: dict[str, int] = field(default_factory=dict)
    _exact: dict[str, _Choice] = field(default_factory=dict)
    _generic: _Choice | None = None
    version: int = 0
    """Bumped on every change (watchers and tests can tell a write happened)."""

    # -- objectives ---------------------------------------------------------------------------------------
    def upsert_objective(
        self, source: str, name: str, priority: int | None, *, rank: int = RANK_CONFIG
    ) -> None:
        """Create or replace the objective held by ``source`` (priority None = 0, as the reference)."""
        self._objectives[source] = (name, int(priority or 0), rank)
        self._rebuild_objectives()

    def delete_objective(self, source: str) -> None:
        if self._objectives.pop(source, None) is not None:
            self._rebuild_objectives()

    def priority(self, objective: str | None) -> int:
        """The objective's priority; 0 when unknown or absent."""
        if not objective:
            return 0
        return self._priority.get(objective, 0)

    def objectives(self) -> Mapping[str, int]:
        return dict(self._priority)

    def _rebuild_objectives(self) -> None:
        # The lowest rank wins; two sources of one rank naming the same objective: the one inserted first.
        out: dict[str, int] = {}
        for name, prio, _ in _winners(self._objectives, lambda e: e[0], lambda e: e[2]):
            out.setdefault(name, prio)
        self._priority = out
        self.version += 1

    # -- model rewrites -----------------------------------------------------------------------------------
    def upsert_rewrite(
        self,
        source: str,
        rules: Sequence[RewriteRule],
        created: float,
        *,
        name: str | None = None,
        rank: int = RANK_CONFIG,
    ) -> None:
        """Create or replace the rewrite object held by ``source`` (``name``: the object's name, by default
        ``source``); ``created`` orders equal-kind matches of one rank."""
        for rule in rules:
            if not rule.targets:
                raise ValueError(f"{source}: a rewrite rule needs at least one target")
        self._rewrites[source] = _Rewrite(created, tuple(rules), name or source, rank)
        self._rebuild_rewrites()

    def delete_rewrite(self, source: str) -> None:
        if self._rewrites.pop(source, None) is not None:
            self._rebuild_rewrites()

    def rewrite(self, model: str, rng: random.Random) -> str | None:
        """The target model for ``model`` (a weighted draw), or None when no rule applies."""
        choice = self._exact.get(model) or self._generic
        return choice.pick(rng) if choice is not None else None

    def _rebuild_rewrites(self) -> None:
        exact: dict[str, _Choice] = {}
        generic: _Choice | None = None
        live = {id(rw) for rw in _winners(self._rewrites, lambda r: r.name, lambda r: r.rank)}
        ordered = sorted(
            (kv for kv in self._rewrites.items() if id(kv[1]) in live),
            key=lambda kv: (kv[1].rank, kv[1].created, kv[0]),
        )
        for _, rw in ordered:
            for rule in rw.rules:
                choice = _prepare(rule.targets)
                if not rule.matches:
                    generic = generic or choice
                for m in rule.matches:
                    exact.setdefault(m, choice)
        self._exact, self._generic = exact, generic
        self.version += 1


def _prepare(targets: Sequence[RewriteTarget]) -> _Choice:
    total = 0
    cumulative: list[int] = []
    for t in targets:
        total += t.weight
        cumulative.append(total)
    return _Choice(tuple(t.model for t in targets), tuple(cumulative))


# -- the picker's YAML ------------------------------------------------------------------------------------
def load_objectives(store: RequestControlStore, raw: Any, where: str) -> None:
    """``objectives: [{name, priority?}]`` (or a ``{name: priority}`` mapping) into ``store``."""
    if raw is None:
        return
    items: list[tuple[str, Any]]
    if isinstance(raw, Mapping):
        items = [(str(k), v) for k, v in raw.items()]
    elif isinstance(raw, list):
        items = []
        for i, o in enumerate(raw):
            if not isinstance(o, Mapping) or set(o) - {"name", "priority"}:
                raise config_error(f"{where}[{i}]: expected {{name, priority}}")
            name = o.get("name")
            if not isinstance(name, str) or not name:
                raise config_error(f"{where}[{i}].name: required string")
            items.append((name, o.get("priority")))
    else:
        raise config_error(f"{where}: expected a list of {{name, priority}} or a name → priority mapping")
    for name, prio in items:
        if prio is not None and (isinstance(prio, bool) or not isinstance(prio, int)):
            raise config_error(f"{where}.{name}.priority: expected an integer, got {prio!r}")
        store.upsert_objective(f"config/{name}", name, prio)


def load_rewrites(store: RequestControlStore, raw: Any, where: str) -> None:
    """``modelRewrites: [{name, rules: [{matches: [{model: {type: Exact, value}}], targets: [...]}]}]``."""
    if raw is None:
        return
    if not isinstance(raw, list):
        raise config_error(f"{where}: expected a list of {{name, rules}}")
    for i, obj in enumerate(raw):
        w = f"{where}[{i}]"
        if not isinstance(obj, Mapping) or set(obj) - {"name", "rules"}:
            raise config_error(f"{w}: expected {{name, rules}}")
        name = obj.get("name") or f"rewrite-{i}"
        rules_raw = obj.get("rules")
        if not isinstance(rules_raw, list) or not rules_raw:
            raise config_error(f"{w}.rules: expected a non-empty list")
        rules = [parse_rule(r, f"{w}.rules[{j}]") for j, r in enumerate(rules_raw)]
        store.upsert_rewrite(f"config/{name}", rules, created=float(i), name=str(name))


def parse_rule(raw: Any, where: str) -> RewriteRule:
    """One rule in the CRD's shape (also used by the Kubernetes source)."""
    if not isinstance(raw, Mapping) or set(raw) - {"matches", "targets"}:
        raise config_error(f"{where}: expected {{matches, targets}}")
    matches: list[str] = []
    for k, m in enumerate(raw.get("matches") or []):
        model = m.get("model") if isinstance(m, Mapping) else None
        if not isinstance(model, Mapping):
            raise config_error(f"{where}.matches[{k}]: expected {{model: {{type: Exact, value}}}}")
        if model.get("type", "Exact") != "Exact":
            raise config_error(f"{where}.matches[{k}].model.type: {model.get('type')!r}; valid: Exact")
        value = model.get("value")
        if not isinstance(value, str) or not value:
            raise config_error(f"{where}.matches[{k}].model.value: required non-empty string")
        matches.append(value)
    targets_raw = raw.get("targets")
    if not isinstance(targets_raw, list) or not targets_raw:
        raise config_error(f"{where}.targets: at least one target is required")
    targets: list[RewriteTarget] = []
    weighted = [isinstance(t, Mapping) and t.get("weight") is not None for t in targets_raw]
    if any(weighted) and not all(weighted):
        raise config_error(f"{where}.targets: give a weight to every target or to none")
    for k, t in enumerate(targets_raw):
        model = t.get("modelRewrite") if isinstance(t, Mapping) else None
        if not isinstance(model, str) or not model:
            raise config_error(f"{where}.targets[{k}].modelRewrite: required non-empty string")
        weight = t.get("weight", 1) if weighted[k] else 1
        if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= MAX_WEIGHT:
            raise config_error(f"{where}.targets[{k}].weight: expected an integer 1..{MAX_WEIGHT}")
        targets.append(RewriteTarget(model, weight))
    return RewriteRule(tuple(matches), tuple(targets))
