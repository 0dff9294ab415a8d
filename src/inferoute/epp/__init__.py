"""The endpoint picker (EPP): decide where each inference request goes.

Theory of operation
-------------------
The picker is three layers wired together once, in :mod:`inferoute.epp.assembly`:

* **data layer** (:mod:`.datalayer`): an endpoint *source* (a static list or a watched YAML file) feeds a
  :class:`~.datalayer.datastore.Datastore`; a *collector* scrapes every endpoint's Prometheus page
  concurrently
  on a short tick (50 ms by default) and stores a small immutable :class:`~.datalayer.metrics.EndpointMetrics`
  snapshot per endpoint. Parsing is hand-written and only looks at the few families the scorers need.
* **request control** (:mod:`.requestcontrol`, glued by :mod:`.director`): parse the body (model, prompt
  bytes),
  apply the control headers (model rewrite, objective, fairness id), choose candidates (subset hint,
  readiness,
  staleness), admit (the flow-control seam: shed sheddable requests while saturated), schedule, then record
  the
  pick in the *learned state* (prefix index, in-flight counts) and hand back an ordered destination list.
  A :class:`~.director.Session` follows the response to release in-flight counts and read token usage.
* **scheduling** (:mod:`.scheduling`): profiles of filters → weighted scorers → one picker, GIE's plugin
  model.
  The engine, not the plugins, clamps scores to [0, 1], applies the weights and times every plugin.

Everything that decides is synchronous and clock-injected; the only I/O is the collector's HTTP scrapes and
the
endpoints-file watcher, both owned by a :class:`~inferoute.tasks.TaskSet` in the
:class:`~.assembly.EmbeddedPicker`.
"""
