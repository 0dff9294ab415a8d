"""The request target, normalised once: what routes match and what the model server receives.

Why: a route is a path prefix (``/v1/``), and a model server also serves admin paths
(``/reset_prefix_cache``, ``/sleep``). If routes matched the raw path while the forwarding client resolved
``..`` afterwards, ``/v1/../reset_prefix_cache`` would pass the ``/v1/`` route and reach the admin path. So
the gateway resolves the target here, matches the result, and forwards exactly that string (the HTTP client is
told not to touch it). Rules (RFC 9112 3.2, RFC 3986 5.2.4):

* absolute-form (``POST http://host/v1/completions``) is accepted: its path and query are used, the
  authority is ignored (the gateway chooses the upstream);
* ``.`` and ``..`` segments are resolved; ``..`` above the root is a 400;
* percent-encoded dots, slashes and backslashes (``%2e``, ``%2f``, ``%5c``, any case) and raw backslashes
  are a 400: they mean a different path to different decoders;
* anything that is not origin-form or absolute-form (``*``, authority-form, control characters) is a 400.

Pure: strings in, a string or :class:`~inferoute.errors.InferouteError` out.
"""

from __future__ import annotations

import re

from inferoute.errors import InferouteError

_AMBIGUOUS = re.compile(r"%(?:2[eEfF]|5[cC])|\\")
_ABSOLUTE = re.compile(r"^[hH][tT][tT][pP][sS]?://[^/?#]*")


def _bad(message: str) -> InferouteError:
    return InferouteError(400, message, cause="bad-path")


def request_target(raw: str) -> str:
    """The origin-form ``path[?query]`` to match and forward, from the request line's target ``raw``."""
    absolute = _ABSOLUTE.match(raw)
    if absolute is not None:
        raw = raw[absolute.end() :] or "/"
        if raw[0] == "?":
            raw = "/" + raw
    if not raw.startswith("/"):
        raise _bad("the request target must be an absolute path")
    path, sep, query = raw.partition("?")
    path = path.partition("#")[0]
    if not path.isprintable() or " " in path:
        raise _bad("the request path contains control characters or spaces")
    if _AMBIGUOUS.search(path):
        raise _bad("the request path contains an encoded dot, slash or backslash")
    if "/." in path:
        path = _remove_dot_segments(path)
    return path + sep + query


def _remove_dot_segments(path: str) -> str:
    out: list[str] = []
    segments = path.split("/")[1:]
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == ".":
            if last:
                out.append("")
        elif seg == "..":
            if not out:
                raise _bad("the request path climbs above the root")
            out.pop()
            if last:
                out.append("")
        else:
            out.append(seg)
    return "/" + "/".join(out)
