"""``inferoute controller``: makes inferoute's gateway a Gateway API Inference Extension (GIE) gateway.

Theory of operation
-------------------
The controller watches six kinds through kopf (the Python operator framework): GatewayClasses, Gateways,
HTTPRoutes, InferencePools, Services and Pods. Each watch event only updates an in-memory copy of the cluster
(:class:`~inferoute.controller.runtime.ClusterCache`) and wakes the reconciler; it never acts on one object.

The reconciler runs one pure function, :func:`~inferoute.controller.translate.translate`: *every* object in
the cache -> one gateway configuration per Gateway of inferoute's GatewayClass (controllerName
:data:`~inferoute.controller.model.CONTROLLER_NAME`) plus the status every object should show. Nothing in it
does I/O or reads a clock (the time for new conditions is passed in), so it is unit-tested object by object
against the GIE conformance expectations.

The shell then writes what changed, and only that: the gateway's YAML into a ConfigMap
(``inferoute-gateway-<gateway>`` in the Gateway's namespace, key ``gateway.yaml``) and/or a file, and status
through merge patches on the ``status`` subresource (lightkube, the project's Kubernetes client). Writing a
status fires a watch event, the next translation gives the same result, nothing is written: the loop settles.

The gateway runs ``inferoute gateway --config .../gateway.yaml --watch-config``: it reloads the file in place,
new requests take the new routes while requests in flight finish on the old ones
(:mod:`inferoute.gateway.reload`).

Why a whole-cluster translation instead of per-object handlers: a pool's status depends on the routes that
name it, a route's on the pools and Gateways, a Gateway's configuration on all of them. Recomputing the whole
picture is simple, obviously consistent, and cheap at the scale of one cluster's routes (milliseconds).
"""
