"""How a picker process shares its in-flight load: the backend and its settings, as plain data that crosses a
process boundary (``spawn`` workers build their syncer from it)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from inferoute.epp.sync.syncer import DEFAULT_INTERVAL, CrossReplicaSyncer

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
"""The URL forms a Redis/Valkey address may take."""


@dataclass(frozen=True, slots=True)
class SyncOptions:
    interval: float = DEFAULT_INTERVAL
    """Seconds between exchanges."""
    redis_url: str | None = None
    """Replicas on several hosts: ``redis://HOST:PORT/DB`` or ``unix:///PATH`` (wins over ``shm_path``)."""
    namespace: str = "default"
    """Keeps pools apart in one Redis (the InferencePool's name)."""
    shm_path: str | None = None
    """``inferoute epp --workers N``: the shared segment (this worker: ``slot`` of ``slots``)."""
    slot: int = 0
    slots: int = 1

    @property
    def ttl(self) -> float:
        """A replica silent this long drops out: five missed exchanges, at least a second."""
        return max(1.0, 5 * self.interval)

    def for_worker(self, slot: int) -> SyncOptions:
        return replace(self, slot=slot)

    def build(self) -> CrossReplicaSyncer:
        if self.redis_url is not None:
            from inferoute.epp.sync.redis_syncer import RedisSyncer

            return RedisSyncer(self.redis_url, namespace=self.namespace, ttl=self.ttl)
        if self.shm_path is None:
            raise ValueError("sync: neither a Redis URL nor a shared-memory segment")
        from inferoute.epp.sync.shm import ShmSyncer

        return ShmSyncer(self.shm_path, self.slot, self.slots, ttl=self.ttl)
