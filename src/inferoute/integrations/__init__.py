"""Configuration generators for the data planes inferoute serves beside its own gateway.

``envoy.py`` writes an Envoy bootstrap whose ext_proc filter asks ``inferoute epp`` for each request's
endpoint (the Endpoint Picker Protocol); ``nginx.py`` writes an NGINX configuration that hands each request to
inferoute's NGINX decider (``inferoute.gateway.nginx_decider``), which answers with ``X-Accel-Redirect``
naming the endpoint NGINX then proxies to.
"""
