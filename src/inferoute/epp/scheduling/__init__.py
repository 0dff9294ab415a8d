"""Scheduling: GIE's plugin model — profiles of filters → weighted scorers → one picker.

* :mod:`.types` — the request, candidates, the per-cycle context and one Protocol per plugin role.
* :mod:`.framework` — the engine: clamps scores, applies weights, times every plugin, returns what the
  learned state should learn (records; it changes nothing itself).
* :mod:`.registry` — kebab-case type names → factories (:func:`~.registry.register_builtins`), parameter
  reading.
* :mod:`.prefix` — chained-xxhash64 approximate prefix blocks (the index they feed is
  :mod:`inferoute.epp.learned.approx`).
* :mod:`.plugins` — one plugin per module; each docstring gives the formula, the inputs and the parameters.
"""
