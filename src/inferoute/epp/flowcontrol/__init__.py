"""Flow control: priority bands, fairness between flows, queueing in front of a saturated pool.

Theory of operation
-------------------
Off by default (``featureGates: ["flowControl"]`` turns it on, as in the reference). Then every request,
after request control (objective → priority, fairness id), goes through the :class:`FlowControl` shell
(:mod:`.shell`) before scheduling:

* the pure :class:`~.controller.FlowController` queues it in its priority band, in the flow of its fairness
  id, under the band's capacity limits (and the global ones);
* a dispatch cycle releases items one at a time: strict priority across bands, the band's fairness policy
  across flows, its ordering policy within a flow, and only while the pool's saturation (the saturation
  detector over the candidate endpoints) is below the band's ceiling (the usage-limit policy). A released
  request is scheduled at that moment, so the next dispatch already sees it in flight;
* the cycle runs when a request arrives, when a response ends, when fresh metrics arrive and when the next
  queue deadline passes. A request that can go at once is decided synchronously (no future, no task);
* a request that cannot go waits on a future until it is dispatched, its TTL runs out (429
  ``rejected-ttl-expired``; 503 when the pool has no endpoints), its client leaves (it leaves the queue at
  once) or the picker shuts down (503). :mod:`.outcomes` maps every outcome to its status, OpenAI JSON body
  and ``x-llm-d-request-dropped-reason``.

With the gate off, the reference's legacy admission stays: a sheddable request (priority < 0) is refused
with 429 while the saturation detector reads >= 1.0.

Modules: one per plugin (``*_fairness``, ``*_ordering``, ``*_detector``, usage limits), :mod:`.types` (the
roles), :mod:`.config` (the ``flowControl:`` section), :mod:`.controller` (decisions), :mod:`.shell`
(waiting), :mod:`.outcomes`, :mod:`.signals` (metrics and the replica recommendation).
"""

from __future__ import annotations

from inferoute.epp.flowcontrol.concurrency_detector import ConcurrencyDetector
from inferoute.epp.flowcontrol.types import SaturationDetector
from inferoute.epp.flowcontrol.utilization_detector import UtilizationDetector

__all__ = ["ConcurrencyDetector", "SaturationDetector", "UtilizationDetector"]
