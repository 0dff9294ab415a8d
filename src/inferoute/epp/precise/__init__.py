"""Precise prefix-cache routing: what each model server really holds, from its own KV-cache events.

Theory of operation
-------------------
Every model server started with vLLM's ``--kv-events-config`` (or ``inferoute sim`` with the same flag)
publishes which KV blocks it stores and evicts. :mod:`~inferoute.epp.precise.subscriber` runs one ZMQ
subscriber per endpoint (following the endpoint set), recovers lost batches through the server's replay socket
and notices publisher restarts (:mod:`~inferoute.epp.precise.tracker`, pure). The events feed
:mod:`~inferoute.epp.precise.index` (pure): block keys of the picker's own, recomputed from the events' token
ids as llm-d does, with reference-counted residency per (block, endpoint).

At pick time the request's prompt is tokenized (:mod:`~inferoute.epp.precise.tokenize`: through the model
server's render endpoint, or locally with the simulator's tokenizer or a Hugging Face tokenizer file), cut
into the same block keys, and matched against the index: the leading blocks each endpoint holds. The
``precise-prefix-cache-producer`` plugin owns the index and the subscribers; ``prefix-cache-scorer`` with
``prefixMatchInfoProducerName: precise-prefix-cache-producer`` scores with it; ``token-producer`` tokenizes
through the render endpoint before scheduling.

Every picker process and replica subscribes to every endpoint, so all of them converge to the same index:
this state needs no sharing between pickers.
"""
