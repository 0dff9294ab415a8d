"""Learned state: what the picker knows from its own decisions and from the model servers' reports.

Two things are learned rather than scraped:

* **in-flight accounting** — requests and tokens the picker sent to each endpoint that have not finished yet.
  Scrapes arrive every 50 ms; a burst of picks inside one interval would all see the same queue length, so
  scorers add what we know we sent since;
* **prefix residency** — which endpoint (probably) holds which prompt prefix in its KV cache: approximately,
  from where the picker sent prompts (:mod:`.approx`), or precisely, from the servers' KV-cache events
  (:class:`inferoute.epp.precise.index.PreciseIndex`).

:mod:`.port` is the interface scheduling and the director depend on: an immutable per-cycle
:class:`~.port.LearnedView`, and records (:data:`~.port.Record`) that the scheduler returns and the director
applies. :mod:`.local` is the in-process implementation. Nothing here imports scheduling: scheduling depends
on this package, never the other way round.
"""

from __future__ import annotations

from inferoute.epp.learned.approx import PrefixIndex
from inferoute.epp.learned.local import LocalLearnedState, LocalView
from inferoute.epp.learned.port import (
    IDLE,
    Capacity,
    EngineEvents,
    Finished,
    FirstByte,
    Inflight,
    LearnedState,
    LearnedView,
    Placed,
    PrefixStore,
    Record,
    Started,
)

__all__ = [
    "IDLE",
    "Capacity",
    "EngineEvents",
    "Finished",
    "FirstByte",
    "Inflight",
    "LearnedState",
    "LearnedView",
    "LocalLearnedState",
    "LocalView",
    "Placed",
    "PrefixIndex",
    "PrefixStore",
    "Record",
    "Started",
]
