"""Serving the Endpoint Picker Protocol.

Theory of operation: ``servicer.py`` turns one ext_proc stream (request headers, body, response headers,
body, trailers) into calls on a :class:`inferoute.picking.Picker` and answers with header mutations (the
chosen endpoint in ``x-gateway-destination-endpoint`` and its dynamic-metadata twin) or an immediate
response. The same stream logic runs on either transport: inferoute's own gRPC-over-HTTP/2 server
(``h2server.py``, the default, where each message is handled synchronously as it arrives) or grpc.aio;
``server.py`` binds the servicer and the gRPC health service (``health.py``, SERVING once the datastore has
ready endpoints) on the chosen transport. ``tls.py`` builds the server's TLS context (a self-signed
certificate by default, reloaded when the files change).
"""
