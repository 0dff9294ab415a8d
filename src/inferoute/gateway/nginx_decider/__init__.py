"""The NGINX decider: inferoute decides, stock NGINX carries the bytes (``inferoute gateway --mode nginx``).

Theory of operation
-------------------
NGINX buffers the client's request body and proxies the request once to this decider (the ``location``
that ``inferoute nginx-config`` generates). The decider runs exactly what the gateway runs -- BBR, then the
picker, then destination validation, through :class:`inferoute.gateway.routing.RequestRouter` -- and answers
with *no body*:

* success: ``200`` with ``X-Accel-Redirect: @inference`` plus the decision in headers (table below). NGINX
  internally redirects to its ``@inference`` named location, copies those headers into variables
  (``$inference_upstream``, ``$inference_model``, ...) with ``set`` and proxies the *same buffered body* to
  ``http://$inference_upstream``. NGINX streams the answer (SSE token by token) itself: no response byte
  goes through Python.
* failure: the status the gateway would answer (400, 413, 429, 502, 503, 504, ...) with an OpenAI-style
  JSON body and no ``X-Accel-Redirect``; NGINX passes it to the client as is.

Headers of a redirect answer (the decider -> NGINX protocol; NGINX never forwards them to the client, and
the decider sends nothing else worth leaking):

=============================  =============================================================================
``X-Accel-Redirect``           ``@inference`` (no fallback) or ``@inference_retry`` (fallbacks follow)
``X-Inference-Upstream``       the picked ``ip:port``
``X-Inference-Fallback-<n>``   the n-th fallback ``ip:port`` (n = 1 .. NGINX's ``X-Inference-Retries``),
                               tried by NGINX after a 500/502/503 before the first byte (the gateway's rule)
``X-Inference-Fallbacks``      all fallbacks, comma separated (for logs)
``X-Inference-Model``          the model found by BBR (empty: body-less request, header not set)
``X-Inference-Request-Id``     token naming the picker session; echoed back by the completion report
``X-Inference-Hdr-<name>``     a request header the picker set (header mutation); NGINX forwards the names
                               it was generated with (``nginx-config --pass-header``)
=============================  =============================================================================

Response-phase accounting: the picker's in-flight counts must be released when the response ends. After
the response has been sent (or the client went away) NGINX reports the token, ``$upstream_addr``,
``$upstream_status``, ``$upstream_header_time`` and ``$request_completion`` -- either with ``post_action
@inference_done`` (one body-less HTTP request to ``/_inferoute/done``; reliable) or from its access log as a
syslog UDP datagram to the decider's port number (``nginx-config --report syslog``; far cheaper, lost only
under overload). The decider then calls ``response_started`` and ``response_finished`` (or ``aborted``) on
the session. A session whose report never arrives (NGINX killed, a lost datagram, a config without reports)
is aborted after ``completion_timeout`` seconds. Lost compared with the gateway: per-chunk reporting
(``response_chunk``) and response headers, so the picker sees neither token usage nor time-to-first-token.

A request whose decision NGINX cannot express -- the picker replaced the body (model rewrite) -- is
*relayed*: the decider forwards that request itself through the gateway's own forwarding path
(:class:`inferoute.gateway.relay.Relay`: the same fallback walk on connect errors and on a 5xx before the
first byte, the same hop-by-hop rules, the answer streamed back with ``X-Accel-Buffering: no``) and the
relay ends the session.
"""
