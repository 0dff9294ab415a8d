"""The Envoy ext_proc wire protocol, both directions (the Endpoint Picker Protocol rides on it).

Theory of operation
-------------------
One ext_proc gRPC stream carries one HTTP request. The proxy (Envoy, or our gateway through
:class:`~inferoute.extproc.client.GrpcPicker`) sends ``ProcessingRequest`` messages for each phase it is
configured to share -- request headers, request body chunks, trailers, then the response phase -- and the
processor (``inferoute epp``, :mod:`inferoute.epp.serving.servicer`) answers each with a
``ProcessingResponse``.

The endpoint picker holds its request-headers reply until the whole body has arrived (FULL_DUPLEX_STREAMED),
then answers with a header mutation ``x-gateway-destination-endpoint`` plus the same value in dynamic
metadata ``envoy.lb``, and streams the body back in 62,000-byte chunks. A refusal is an ``ImmediateResponse``
carrying an HTTP status and an OpenAI-style JSON body.

Layout:

- :mod:`.messages` -- pure builders and parsers over the generated ``xds-protos`` types; no I/O. Every
  protocol detail (``raw_value`` vs ``value``, chunking, metadata shapes, subset-hint forms) lives here.
- :mod:`.channel` -- gRPC channel construction (TLS, mTLS, keepalive, certificate reload).
- :mod:`.failures` -- one mapping of a failed call (timeout, TLS, unavailable, protocol) for both clients.
- :mod:`.client` -- :class:`GrpcPicker`, the data-plane side: a :class:`inferoute.picking.Picker` over gRPC.
- :mod:`.bbr_client` / :mod:`.bbr_server` -- body-based routing (model -> ``X-Gateway-Model-Name``).

The picker side's servicer lives in :mod:`inferoute.epp.serving.servicer`.
"""
