"""Built-in EndpointPickerConfig profiles (YAML), loaded by
:func:`inferoute.epp.config.builtin_profile_text`."""
