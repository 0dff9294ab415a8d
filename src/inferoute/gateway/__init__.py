"""The gateway: inferoute's own data plane.

Theory of operation
-------------------
One request goes through three stages, each its own module:

1. **Decide** (:mod:`.decide`, pure apart from the injected picker): strip client-supplied routing headers
   (:mod:`.destinations`), read the model from the body (:mod:`.bbr`, or a remote BBR over ext_proc), ask the
   picker (embedded in process, or ``inferoute epp`` over gRPC — :mod:`.pickers` builds and pools them), check
   every returned endpoint against the pool / allowed CIDRs. The NGINX decider (:mod:`.decider`) runs the very
   same :class:`~inferoute.gateway.routing.RequestRouter`, so both data planes route identically.
2. **Forward** (:mod:`.proxy`): one aiohttp ``ClientSession`` per process with keep-alive pools per upstream;
   the ordered endpoint list is walked on connect errors and 5xx answers before the first byte reaches the
   client; the response is streamed chunk by chunk (SSE token by token) and reported to the picker session.
3. **Serve** (:mod:`.app`): the aiohttp server — limits (header size, concurrency, body size),
   ``x-request-id``, the access log line, ``/healthz``, ``/readyz``, ``/metrics`` (:mod:`.metrics`), and
   OpenAI-style JSON errors for every failure.

:mod:`.config` is the typed YAML file (every key in docs/configuration.md); :mod:`.cli` holds
``inferoute gateway`` (``--workers N`` = N processes on one SO_REUSEPORT port, :mod:`.workers`) and
``inferoute up`` (simulator pool + embedded picker + gateway, :mod:`.up`).
"""
