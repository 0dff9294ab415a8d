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
for the picker's YAML, ``NAMESPACE/NAME`` for a Kubernetes object), so a CRD watcher replacing or deleting
its object never touches what the YAML declared. Lookups are dictionary reads kept current on every write
(writes are rare, lookups happen on every request).
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from inferoute.epp.plugin import config_error

MAX_WEIGHT = 1_000_000


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


@dataclass(slots=True)
class RequestControlStore:
    """Objectives and model rewrites from every source (see module docstring)."""

    _objectives: dict[str, tuple[str, int]] = field(default_factory=dict)
    """source → (objective name, priority)."""
    _rewrites: dict[str, _Rewrite] = field(default_factory=dict)
    _priority: dict[str, int] = field(default_factory=dict)
    _exact: dict[str, _Choice] = field(default_factory=dict)
    _generic: _Choice | None = None
    version: int = 0
    """Bumped on every change (watchers and tests can tell a write happened)."""

    # -- objectives ---------------------------------------------------------------------------------------
    def upsert_objective(self, source: str, name: str, priority: int | None) -> None:
        """Create or replace the objective held by ``source`` (priority None = 0, as the reference)."""
        self._objectives[source] = (name, int(priority or 0))
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
        # Two sources naming the same objective: the one inserted first wins (stable, as dicts keep order).
        out: dict[str, int] = {}
        for name, prio in self._objectives.values():
            out.setdefault(name, prio)
        self._priority = out
        self.version += 1

    # -- model rewrites -----------------------------------------------------------------------------------
    def upsert_rewrite(self, source: str, rules: Sequence[RewriteRule], created: float) -> None:
        """Create or replace the rewrite object held by ``source``; ``created`` orders equal-kind matches."""
        for rule in rules:
            if not rule.targets:
                raise ValueError(f"{source}: a rewrite rule needs at least one target")
        self._rewrites[source] = _Rewrite(created, tuple(rules))
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
        ordered = sorted(self._rewrites.items(), key=lambda kv: (kv[1].created, kv[0]))
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
        store.upsert_rewrite(f"config/{name}", rules, created=float(i))


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
