"""What to do with each live message of one publisher, from its sequence number alone. Pure.

The rules (llm-d-router's ``zmq_subscriber.go``, made explicit):

* ``APPLY`` — the next batch (``seq == last + 1``), or the very first one when it is batch 0.
* ``REPLAY`` — a gap: batches between ``last`` and ``seq`` were lost (PUB dropped them, or the subscriber
  joined mid-stream); ask the replay socket for everything from ``last + 1`` (``0`` when nothing was applied).
* ``DUPLICATE`` — already applied through a replay (live messages queued while the replay ran).
* ``RESTART`` — the live sequence went backwards (``seq <= previous live seq``): the publisher restarted with
  an empty cache. Forget the endpoint, then apply from 0 (replaying when ``seq > 0``).
"""

from __future__ import annotations

from enum import Enum


class Action(Enum):
    APPLY = "apply"
    REPLAY = "replay"
    DUPLICATE = "duplicate"
    RESTART = "restart"


class SeqTracker:
    __slots__ = ("last", "prev_live")

    def __init__(self) -> None:
        self.last = -1
        """The newest batch applied (-1: none)."""
        self.prev_live = -1
        """The sequence of the previous live message (-1: none yet)."""

    def on_live(self, seq: int) -> Action:
        prev, self.prev_live = self.prev_live, seq
        if prev >= 0 and seq <= prev:
            return Action.RESTART
        if seq <= self.last:
            return Action.DUPLICATE
        if seq == self.last + 1:
            return Action.APPLY
        return Action.REPLAY

    def applied(self, seq: int) -> None:
        if seq > self.last:
            self.last = seq

    def restart(self, seq: int) -> None:
        """After a publisher restart: nothing applied; ``seq`` was the live message that revealed it."""
        self.last = -1
        self.prev_live = seq

    @property
    def replay_from(self) -> int:
        return self.last + 1
