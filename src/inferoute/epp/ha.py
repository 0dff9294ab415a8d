"""Active-passive high availability: leader election on a ``coordination.k8s.io/v1`` Lease.

Theory of operation (the reference picker's ``--ha-enable-leader-election``, client-go's algorithm):

* Every replica runs discovery, scrapes metrics and keeps its datastore warm; only the **leader reports
  ready** (gRPC health and ``/readyz``), so the picker Service sends gateways to the leader alone. A request
  that reaches a standby anyway is still routed (:class:`LeaderGatedPicker` gates readiness, not picking).
* Every ``retry_period`` a replica reads the Lease. No Lease: create it holding it. Held by itself: renew
  (``renewTime``). Held by another: wait until the record has not changed for ``lease_duration`` *as seen by
  this replica's own clock* (no clock comparison between hosts), or until the holder released it (empty
  ``holderIdentity``), then take it over (``leaseTransitions`` + 1).
* A standby that saw no change sleeps until the Lease would expire by its clock when that comes before the
  next ``retry_period`` tick, so it tries to take over at the expiry rather than up to one period later.
* A leader that has not renewed successfully for ``renew_deadline`` steps down at once (it stops reporting
  ready before another replica can take over: ``renew_deadline < lease_duration``).
* On a clean shutdown the leader releases the Lease, so a standby takes over within one ``retry_period``.
* Writes carry the Lease's ``resourceVersion``, so of two replicas racing for an expired Lease the API server
  accepts one (409 Conflict for the other).

Defaults (lease 2 s, renew deadline 1.5 s, retry 0.5 s; client-go's are 15/10/2 s) put the takeover after
a leader dies without releasing between ``lease_duration - retry_period`` and ``lease_duration +
retry_period``, 1.5-2.5 s (the leader's last renewal was up to one period before its death, the standby saw
it up to one period after). :class:`Election` is pure (an injected clock, no I/O); :class:`LeaseElector` is
the asyncio shell over lightkube.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

import httpx2
from lightkube import AsyncClient, KubeConfig
from lightkube.models.coordination_v1 import LeaseSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.coordination_v1 import Lease
from lightkube.types import PatchType

from inferoute.clock import Clock
from inferoute.epp.datalayer.kubernetes_watch import api_status
from inferoute.picking import Decision, PickRequest, PickSession

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class HaOptions:
    lease_name: str
    namespace: str
    identity: str
    lease_duration: float = 2.0
    renew_deadline: float = 1.5
    retry_period: float = 0.5

    def check(self) -> str | None:
        """A one-line error when the timings cannot work, else None."""
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            return "leader election: need 0 < retry period < renew deadline < lease duration"
        return None


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """The fields of a Lease that the election reads and writes."""

    holder: str = ""
    duration: int = 0
    transitions: int = 0
    acquire_time: dt.datetime | None = None
    renew_time: dt.datetime | None = None
    resource_version: str | None = None

    def same_term(self, other: LeaseRecord | None) -> bool:
        """Same holder and same renewal: nothing happened since ``other`` was seen."""
        return other is not None and (self.holder, self.renew_time) == (other.holder, other.renew_time)


Action = Literal["create", "renew", "acquire", "wait"]


class Election:
    """The election state of one replica (pure; see module docstring)."""

    def __init__(self, opts: HaOptions, clock: Clock) -> None:
        self.opts = opts
        self.clock = clock
        self.observed: LeaseRecord | None = None
        self.observed_at = 0.0
        self.last_renewed: float | None = None
        """Clock time of this replica's last successful create/renew/acquire while leading."""

    def observe(self, record: LeaseRecord | None) -> None:
        now = self.clock.now()
        if record is None or not record.same_term(self.observed):
            self.observed_at = now
        self.observed = record

    def decide(self) -> Action:
        """What to do with the Lease last observed."""
        rec = self.observed
        if rec is None:
            return "create"
        if rec.holder == self.opts.identity:
            return "renew"
        duration = rec.duration or math.ceil(self.opts.lease_duration)
        if rec.holder and self.clock.now() - self.observed_at < duration:
            return "wait"
        return "acquire"

    def desired(self, action: Action, wall: dt.datetime) -> LeaseRecord:
        """The record to write for ``action`` (``wall``: the wall-clock time written into the Lease)."""
        rec = self.observed or LeaseRecord()
        duration = max(1, math.ceil(self.opts.lease_duration))
        if action == "renew":
            return replace(rec, renew_time=wall, duration=duration)
        transitions = rec.transitions + 1 if action == "acquire" else 0
        return LeaseRecord(self.opts.identity, duration, transitions, wall, wall, rec.resource_version)

    def next_delay(self, action: Action | None) -> float:
        """Seconds until the next round after ``action`` (None: the round failed): the retry period, or
        less while waiting for a lease that expires sooner (never zero after a failure: no busy loop)."""
        rec, retry = self.observed, self.opts.retry_period
        if action != "wait" or rec is None or not rec.holder:
            return retry
        duration = rec.duration or math.ceil(self.opts.lease_duration)
        return min(retry, max(0.0, self.observed_at + duration - self.clock.now()))

    def written(self, record: LeaseRecord) -> None:
        """A create/renew/acquire succeeded."""
        self.observe(record)
        self.last_renewed = self.clock.now()

    def is_leader(self) -> bool:
        """Holding the Lease and renewed within ``renew_deadline``."""
        if self.last_renewed is None or self.observed is None:
            return False
        if self.observed.holder != self.opts.identity:
            return False
        return self.clock.now() - self.last_renewed < self.opts.renew_deadline


def record_of(lease: Any) -> LeaseRecord:
    spec = lease.spec or LeaseSpec()
    return LeaseRecord(
        holder=spec.holderIdentity or "",
        duration=int(spec.leaseDurationSeconds or 0),
        transitions=int(spec.leaseTransitions or 0),
        acquire_time=spec.acquireTime,
        renew_time=spec.renewTime,
        resource_version=lease.metadata.resourceVersion if lease.metadata else None,
    )


def _spec(rec: LeaseRecord) -> LeaseSpec:
    return LeaseSpec(
        holderIdentity=rec.holder,
        leaseDurationSeconds=rec.duration,
        leaseTransitions=rec.transitions,
        acquireTime=rec.acquire_time,
        renewTime=rec.renew_time,
    )


class LeaseElector:
    """Runs :class:`Election` against the API server every ``retry_period`` (see module docstring)."""

    def __init__(
        self,
        opts: HaOptions,
        config: KubeConfig,
        clock: Clock,
        *,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.opts = opts
        self.election = Election(opts, clock)
        self._config = config
        self._on_change = on_change
        self._leading = False
        self._client: AsyncClient | None = None
        self.rounds = 0
        """Completed election rounds (successful or not)."""

    def is_leader(self) -> bool:
        return self.election.is_leader()

    def _api(self) -> AsyncClient:
        if self._client is None:
            timeout = httpx2.Timeout(self.opts.retry_period * 2)
            self._client = AsyncClient(config=self._config, namespace=self.opts.namespace, trust_env=False,
                                       timeout=timeout)  # fmt: skip
        return self._client

    async def run(self) -> None:
        """Elect until cancelled; a leader releases the Lease when cancelled."""
        try:
            while True:
                action: Action | None = None
                try:
                    action = await self.read()
                    if action != "wait":
                        await self.write(action)
                except (httpx2.HTTPError, httpx2.StreamError, OSError) as exc:
                    log.warning("leader election: %s", _describe(exc))
                    action = None
                self.rounds += 1
                self._notify()
                await asyncio.sleep(self.election.next_delay(action))
        finally:
            await asyncio.shield(self._release_and_close())

    async def read(self) -> Action:
        """One look at the Lease: what this replica should do now."""
        o = self.opts
        try:
            lease = await self._api().get(Lease, o.lease_name, namespace=o.namespace)
            self.election.observe(record_of(lease))
        except httpx2.HTTPStatusError as exc:
            if (api_status(exc) or (0, ""))[0] != 404:
                raise
            self.election.observe(None)
        return self.election.decide()

    async def write(self, action: Action) -> None:
        """Create, renew or take over the Lease; an API error (409 Conflict: another replica wrote first)
        propagates and leaves this replica's state as it was."""
        o, client = self.opts, self._api()
        rec = self.election.desired(action, dt.datetime.now(dt.UTC))
        if action == "create":
            meta = ObjectMeta(name=o.lease_name, namespace=o.namespace)
            written = await client.create(Lease(metadata=meta, spec=_spec(rec)))
        else:
            patch: dict[str, Any] = {"spec": _spec(rec).to_dict()}
            if rec.resource_version:  # optimistic concurrency: 409 if someone wrote in between
                patch["metadata"] = {"resourceVersion": rec.resource_version}
            written = await client.patch(
                Lease, o.lease_name, patch, namespace=o.namespace, patch_type=PatchType.MERGE
            )
        self.election.written(record_of(written))
        if action != "renew":
            log.info(
                "leader election: %s is the leader now (lease %s/%s)", o.identity, o.namespace, o.lease_name
            )

    def _notify(self) -> None:
        leading = self.election.is_leader()
        if leading != self._leading:
            self._leading = leading
            if not leading:
                log.warning(
                    "leader election: %s is not the leader (standby; reporting not ready)", self.opts.identity
                )
            if self._on_change is not None:
                self._on_change(leading)

    async def _release_and_close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:
            if self.election.is_leader():
                release = {"spec": {"holderIdentity": "", "leaseDurationSeconds": 1}}
                await client.patch(
                    Lease,
                    self.opts.lease_name,
                    release,
                    namespace=self.opts.namespace,
                    patch_type=PatchType.MERGE,
                )
                log.info("leader election: released the lease")
        except (httpx2.HTTPError, httpx2.StreamError, OSError) as exc:
            log.warning("leader election: could not release the lease: %s", _describe(exc))
        finally:
            self.election.last_renewed = None
            await client.close()


def _describe(exc: BaseException) -> str:
    status = api_status(exc)
    if status is None:
        return f"API server unreachable: {type(exc).__name__}: {exc}"
    code, msg = status
    if code in (401, 403):
        return (
            f"forbidden ({code}): grant get/create/update/patch on leases (coordination.k8s.io) (RBAC): {msg}"
        )
    if code == 409:
        return "another replica wrote the lease first (409 Conflict)"
    return f"API error {code}: {msg}"


class LeaderGatedPicker:
    """A picker that reports ready only while leading, and still picks when a request reaches it."""

    def __init__(self, inner: Any, is_leader: Callable[[], bool]) -> None:
        self.inner = inner
        self._is_leader = is_leader

    def ready(self) -> bool:
        return bool(self._is_leader() and self.inner.ready())

    async def pick(self, request: PickRequest) -> tuple[Decision, PickSession]:
        result: tuple[Decision, PickSession] = await self.inner.pick(request)
        return result

    async def aclose(self) -> None:
        await self.inner.aclose()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
