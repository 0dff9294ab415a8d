"""Request-control config plugins.

``openai-parser`` takes no parameters: the OpenAI body parser is built in. ``latency-slo-admitter``
(:mod:`.slo_admitter`) sheds sheddable requests no endpoint can serve within their TTFT objective.
"""

from __future__ import annotations

from inferoute.epp.plugin import Factory, no_params
from inferoute.epp.requestcontrol import slo_admitter

FACTORIES: dict[str, Factory] = {
    "openai-parser": no_params("openai-parser"),
    slo_admitter.TYPE: slo_admitter.create,
}
