"""Built-in scheduling plugins, one per module, registered by
:func:`inferoute.epp.scheduling.registry.register_builtins`.

Each module exposes ``TYPE`` (the config type name), ``ROLE`` and ``create(name, params, deps)``.
Scorers return raw scores; the engine clamps them to [0, 1] and applies the profile's weight.
"""
