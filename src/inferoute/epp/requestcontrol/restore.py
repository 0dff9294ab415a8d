"""The client sees the model name it asked for: a model rewrite undone in the response.

After a rewrite (``modelRewrites:``, the rewrite header) the model server answers with the target's name in
the ``model`` field of its JSON answer and of every SSE chunk. :class:`ModelRestorer` puts the asked name
back as the body passes, chunk by chunk, in every data plane: the gateway's relay (embedded picker, and the
gRPC picker whose decision carries the name), and ``inferoute epp`` itself when Envoy streams the response
body through it (FULL_DUPLEX_STREAMED response bodies are echoed with the name restored).

Only ``"model": "<target>"`` key/value pairs are replaced (a ``"model"`` preceded by a backslash is text
inside a JSON string, e.g. generated content or tool-call arguments, and is left alone). Whatever follows the
last newline of a chunk and could be the start of a pair is held back until the next chunk (SSE events end
with a newline, so nothing of an event is held). A restorer exists only for rewritten requests: the others
pay nothing.

The reference picker (llm-d-router) does not do this: it echoes the response body unchanged, so its clients
see the target's name. Here the client sees the name it sent, as the issue asks.
"""

from __future__ import annotations

import re

import msgspec

_MAX_SPACE = 8
"""Blanks accepted around the colon of ``"model" : "name"``."""


def _encoded(name: str) -> bytes:
    return msgspec.json.encode(name)


class ModelRestorer:
    """Rewrites ``"model":"<served>"`` to ``"model":"<asked>"`` in a body fed in chunks (see module
    docstring). :meth:`feed` returns what can be sent now; :meth:`finish` what was held back."""

    __slots__ = ("_asked", "_held", "_hold", "_re", "asked", "served")

    def __init__(self, served: str, asked: str) -> None:
        self.served = served
        self.asked = asked
        target = _encoded(served)
        self._asked = _encoded(asked)
        space = rb"[ \t\r]{0,%d}" % _MAX_SPACE
        self._re = re.compile(rb'(?<!\\)("model"' + space + b":" + space + b")" + re.escape(target))
        self._hold = len(b'\\"model"') + 2 * _MAX_SPACE + 1 + len(target)
        """Longest text that may be the start of a pair (a backslash before it included)."""
        self._held = b""

    def _sub(self, data: bytes) -> bytes:
        if b'"model"' not in data:
            return data
        asked = self._asked
        return self._re.sub(lambda mo: mo.group(1) + asked, data)

    def feed(self, chunk: bytes) -> bytes:
        data = self._held + chunk if self._held else chunk
        data = self._sub(data)
        keep = max(data.rfind(b"\n") + 1, len(data) - self._hold)
        if keep >= len(data):
            self._held = b""
            return data
        self._held = data[keep:]
        return data[:keep]

    def finish(self) -> bytes:
        held, self._held = self._held, b""
        return held

    def whole(self, body: bytes) -> bytes:
        """A whole body at once."""
        return self._sub(body)
