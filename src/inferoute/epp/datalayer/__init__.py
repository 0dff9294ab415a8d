"""Data layer: which endpoints exist and what state they are in.

* :mod:`.metrics` — the per-endpoint snapshot (:class:`EndpointMetrics`) and the Model Server Protocol parser
  with engine mappings (vLLM, SGLang, trtllm-serve). Parsing is a few ``bytes.find`` calls per family, no
  full exposition-format parse.
* :mod:`.datastore` — endpoints plus their latest snapshot, readiness and staleness (pure, clock-injected).
* :mod:`.sources` — endpoint sources behind one interface: static list, YAML file (reloaded on change).
* :mod:`.collector` — the async scraper: every endpoint concurrently, each with its own timeout, every tick.
"""
