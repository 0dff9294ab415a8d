"""Cross-replica sync through Redis (or Valkey): picker replicas on different hosts.

Each replica keeps its table in one key, ``PREFIX:REPLICA``, written with an expiry of ``ttl`` (Redis's own
clock: no clock agreement between hosts needed), and its name in the set ``PREFIX:replicas``. One Lua script
per exchange writes ours and returns every live replica's table, dropping the names whose key has expired:
one round trip every interval, whatever the number of replicas. A replica that stops cleanly deletes its key.
"""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import Mapping
from typing import Any

from inferoute.epp.sync.syncer import SnapshotSyncer

_EXCHANGE = """
local prefix = ARGV[1]
redis.call('SET', prefix .. ':' .. ARGV[2], ARGV[3], 'PX', ARGV[4])
redis.call('SADD', KEYS[1], ARGV[2])
local out = {}
for _, r in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local v = redis.call('GET', prefix .. ':' .. r)
  if v then
    out[#out + 1] = r
    out[#out + 1] = v
  else
    redis.call('SREM', KEYS[1], r)
  end
end
return out
"""

_LEAVE = """
redis.call('DEL', ARGV[1] .. ':' .. ARGV[2])
redis.call('SREM', KEYS[1], ARGV[2])
return 1
"""


_instances = itertools.count(1)


def default_replica() -> str:
    """``HOST-PID-N``: unique per syncer on a network of hosts ($POD_NAME wins in a cluster; ``N`` counts
    the syncers of one process, e.g. two gateways in one test)."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}-{os.getpid()}-{next(_instances)}"


class RedisSyncer(SnapshotSyncer):
    """``url``: ``redis://HOST:PORT/DB`` or ``unix:///PATH`` (redis-py's URL forms); ``namespace`` keeps
    pools apart when several share one Redis."""

    def __init__(
        self,
        url: str,
        *,
        replica: str | None = None,
        namespace: str = "default",
        ttl: float = 1.0,
        timeout: float = 0.5,
    ) -> None:
        import redis.asyncio

        super().__init__(replica or default_replica(), ttl)
        self.prefix = f"inferoute:epp-sync:{namespace}"
        self._client: Any = redis.asyncio.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self._exchange = self._client.register_script(_EXCHANGE)
        self._leave = self._client.register_script(_LEAVE)

    async def exchange(self, mine: bytes) -> Mapping[str, bytes]:
        import redis.exceptions

        try:
            flat = await self._exchange(
                keys=[f"{self.prefix}:replicas"],
                args=[self.prefix, self.replica, mine, max(1, int(self.ttl * 1000))],
            )
        except redis.exceptions.RedisError as exc:
            raise ConnectionError(f"redis: {exc}") from exc
        return {flat[i].decode(): flat[i + 1] for i in range(0, len(flat), 2)}

    async def aclose(self) -> None:
        import redis.exceptions

        try:
            await self._leave(keys=[f"{self.prefix}:replicas"], args=[self.prefix, self.replica])
        except (redis.exceptions.RedisError, OSError):
            pass  # the key expires on its own
        finally:
            await self._client.aclose()
