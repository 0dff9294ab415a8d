"""Picker state shared across worker processes and replicas.

Theory of operation
-------------------
What a picker knows comes in two kinds. The **precise prefix index** is derived from the model servers' own
KV-cache events (:mod:`inferoute.epp.precise`): every worker of ``inferoute epp --workers N`` and every
replica subscribes to every endpoint's events (and replays what it missed), so they all converge to the same
index with nothing shared between them. **In-flight load** (requests this picker sent that have not finished)
is known only to the process that picked; it is shared through a syncer in the shape of llm-d-router's
``CrossReplicaSyncer`` (:mod:`.syncer`: ``set``/``get``/``delete``, local and non-blocking, plus an exchange
every 200 ms):

* :mod:`.shm` -- the workers of one ``inferoute epp --workers N`` on one host: one shared-memory slot per
  worker, seqlock-protected;
* :mod:`.redis_syncer` -- replicas on several hosts: one expiring Redis key per replica, one Lua round trip
  per exchange;
* :class:`.syncer.MemorySyncer` -- replicas in one process (tests).

:class:`.inflight.SyncedLearnedState` adds the peers' published in-flight counts to each endpoint's local
ones. What a picker learns from its own decisions -- the approximate prefix index, and the precise index's
speculative entries -- goes through the same exchange as **placements** (:mod:`.placements`): each process
publishes its recent ``Placed`` records and applies the peers', so every index learns every process's
decisions one exchange late (docs/picker.md gives the measured effect).
"""
