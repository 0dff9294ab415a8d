"""inferoute: an inference gateway and endpoint picker (Gateway API Inference Extension) in Python.

Three ways in, one picker:

* ``inferoute gateway`` / ``inferoute up`` -- our own data plane (BBR, picker client, streaming proxy);
* stock NGINX in front, with inferoute deciding (``X-Accel-Redirect`` + ``$inference_upstream``);
* Envoy or any GIE gateway calling ``inferoute epp`` over ext_proc.
"""

__version__ = "0.1.0"
