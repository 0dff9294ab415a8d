"""Request-control config plugins.

``openai-parser`` takes no parameters: the OpenAI body parser is built in.
"""

from __future__ import annotations

from inferoute.epp.plugin import Factory, no_params

FACTORIES: dict[str, Factory] = {"openai-parser": no_params("openai-parser")}
