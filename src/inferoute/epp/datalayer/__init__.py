"""Data layer: which endpoints exist and what state they are in.

* :mod:`.metrics` — the per-endpoint snapshot (:class:`EndpointMetrics`) and the Model Server Protocol parser
  with engine mappings (vLLM, SGLang, trtllm-serve, Triton TensorRT-LLM). Parsing is a few ``bytes.find``
  calls per family, no full exposition-format parse.
* :mod:`.datastore` — endpoints plus their latest snapshot, readiness and staleness (pure, clock-injected).
* :mod:`.sources` — endpoint sources behind one interface: static list, YAML file (reloaded on change).
* :mod:`.collector` — the scraper: a callback state machine per endpoint on a keep-alive connection, each
  with its own timeout and phase, every tick; :mod:`.httpget` frames the HTTP/1.1 responses.
"""
