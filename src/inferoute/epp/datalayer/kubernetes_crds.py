"""InferenceObjective and InferenceModelRewrite objects from Kubernetes into the request-control store.

Theory of operation. With ``--pool-name``, the picker also watches the two llm-d CRDs (``llm-d.ai/v1alpha2``)
and their deprecated twins (``inference.networking.x-k8s.io/v1alpha2``, logged once as deprecated when used)
in the pool's namespace. Objects whose ``spec.poolRef`` names this pool become entries of the one
:class:`~inferoute.epp.requestcontrol.store.RequestControlStore` the picker's YAML (``objectives:``,
``modelRewrites:``) also fills; each Kubernetes object is held under its own source key
(``GROUP/NAMESPACE/NAME``), so adding, changing or deleting it never touches what the YAML declared.

Precedence: an object outranks the YAML entry of the same name (an ``llm-d.ai`` object also outranks a
deprecated-group object of the same name), which is shadowed, not deleted: it applies again when the object
goes away. Among rewrite rules matching one model, objects come before YAML entries (after Exact over
generic).
A CRD that is not installed is logged once and retried slowly; the YAML's entries then apply unshadowed.

:func:`objective_records` and :func:`rewrite_records` are the pure reconcile (objects -> records);
:class:`CrdSync` applies the difference to the store after every watch change.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lightkube import AsyncClient, KubeConfig
from lightkube.generic_resource import create_namespaced_resource

from inferoute.epp.datalayer.kubernetes import POOL_GROUP
from inferoute.epp.datalayer.kubernetes_watch import Backoff, ListWatch
from inferoute.epp.requestcontrol.store import (
    RANK_CRD,
    RANK_CRD_DEPRECATED,
    RequestControlStore,
    RewriteRule,
    parse_rule,
)
from inferoute.errors import ConfigError, InferouteError

log = logging.getLogger(__name__)

GROUPS = ("llm-d.ai", "inference.networking.x-k8s.io")
"""Current group first; the second is deprecated but still reconciled, as the reference does."""
VERSION = "v1alpha2"


@dataclass(frozen=True, slots=True)
class RewriteRecord:
    rules: tuple[RewriteRule, ...]
    created: float
    name: str = ""


def rank_of(source: str) -> int:
    """The store rank of an object's source key: the current group outranks the deprecated one."""
    return RANK_CRD_DEPRECATED if source.startswith(GROUPS[1] + "/") else RANK_CRD


def _for_pool(obj: Mapping[str, Any], pool: str) -> bool:
    ref = (obj.get("spec") or {}).get("poolRef") or {}
    if not isinstance(ref, Mapping):
        return False
    group = ref.get("group") or POOL_GROUP
    kind = ref.get("kind") or "InferencePool"
    return bool(ref.get("name") == pool and group == POOL_GROUP and kind == "InferencePool")


def source_key(group: str, obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{group}/{meta.get('namespace') or ''}/{meta.get('name') or ''}"


def created_at(obj: Mapping[str, Any]) -> float:
    """``metadata.creationTimestamp`` as epoch seconds (absent or unreadable: +inf, i.e. the youngest)."""
    stamp = (obj.get("metadata") or {}).get("creationTimestamp")
    try:
        return dt.datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return float("inf")


def objective_records(
    objects: Iterable[tuple[str, Mapping[str, Any]]], pool: str
) -> dict[str, tuple[str, int | None]]:
    """(group, InferenceObjective) pairs -> {source key: (objective name, priority)} for ``pool``."""
    out: dict[str, tuple[str, int | None]] = {}
    for group, obj in objects:
        if not _for_pool(obj, pool):
            continue
        priority = (obj.get("spec") or {}).get("priority")
        if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)):
            log.error("%s: spec.priority must be an integer; ignored", source_key(group, obj))
            continue
        out[source_key(group, obj)] = (str((obj.get("metadata") or {}).get("name")), priority)
    return out


def rewrite_records(objects: Iterable[tuple[str, Mapping[str, Any]]], pool: str) -> dict[str, RewriteRecord]:
    """(group, InferenceModelRewrite) pairs -> {source key: rules} for ``pool``; invalid objects are logged
    and left out."""
    out: dict[str, RewriteRecord] = {}
    for group, obj in objects:
        if not _for_pool(obj, pool):
            continue
        key = source_key(group, obj)
        try:
            raw = (obj.get("spec") or {}).get("rules")
            if not isinstance(raw, list) or not raw:
                raise ConfigError(f"{key}: spec.rules: expected a non-empty list")
            rules = tuple(parse_rule(r, f"{key}: spec.rules[{i}]") for i, r in enumerate(raw))
        except InferouteError as exc:
            log.error("InferenceModelRewrite ignored: %s", exc.message)
            continue
        out[key] = RewriteRecord(rules, created_at(obj), str((obj.get("metadata") or {}).get("name") or ""))
    return out


class CrdSync:
    """Watches the objective and rewrite CRDs of one pool and keeps the store in step (see module doc)."""

    def __init__(self, store: RequestControlStore, pool: str, namespace: str, config: KubeConfig) -> None:
        self.store, self.pool, self.namespace, self._config = store, pool, namespace, config
        self.objectives: list[tuple[str, ListWatch]] = []
        self.rewrites: list[tuple[str, ListWatch]] = []
        self._applied_objectives: dict[str, tuple[str, int | None]] = {}
        self._applied_rewrites: dict[str, RewriteRecord] = {}
        self._warned_deprecated = False

    async def run(self) -> None:
        client = AsyncClient(config=self._config, namespace=self.namespace, trust_env=False)
        for group in GROUPS:
            for kind, plural, into in (
                ("InferenceObjective", "inferenceobjectives", self.objectives),
                ("InferenceModelRewrite", "inferencemodelrewrites", self.rewrites),
            ):
                res = create_namespaced_resource(group, VERSION, kind, plural)
                # A missing CRD answers 404 until installed: retry slowly (the YAML applies meanwhile).
                watch = ListWatch(client, res, f"{plural}.{group}", self.namespace, self._changed,
                                  backoff=Backoff(0.5, 30.0))  # fmt: skip
                into.append((group, watch))
        try:
            async with asyncio.TaskGroup() as tg:
                for _, watch in self.objectives + self.rewrites:
                    tg.create_task(watch.run(), name=f"k8s-watch-{watch.what}")
        finally:
            await client.close()

    @staticmethod
    def _objects(watches: list[tuple[str, ListWatch]]) -> list[tuple[str, Mapping[str, Any]]]:
        return [(group, obj) for group, w in watches for obj in w.cache.objects.values()]

    def _changed(self) -> None:
        objectives = objective_records(self._objects(self.objectives), self.pool)
        rewrites = rewrite_records(self._objects(self.rewrites), self.pool)
        deprecated = [k for k in [*objectives, *rewrites] if k.startswith(GROUPS[1] + "/")]
        if deprecated and not self._warned_deprecated:
            log.warning("DEPRECATION: %s use %s/%s; move them to %s/%s", deprecated[:3], GROUPS[1], VERSION,
                        GROUPS[0], VERSION)  # fmt: skip
            self._warned_deprecated = True
        for key in self._applied_objectives.keys() - objectives.keys():
            self.store.delete_objective(key)
        for key, (name, priority) in objectives.items():
            if self._applied_objectives.get(key) != (name, priority):
                self.store.upsert_objective(key, name, priority, rank=rank_of(key))
        for key in self._applied_rewrites.keys() - rewrites.keys():
            self.store.delete_rewrite(key)
        for key, rec in rewrites.items():
            if self._applied_rewrites.get(key) != rec:
                self.store.upsert_rewrite(key, rec.rules, rec.created, name=rec.name, rank=rank_of(key))
        self._applied_objectives, self._applied_rewrites = objectives, rewrites
