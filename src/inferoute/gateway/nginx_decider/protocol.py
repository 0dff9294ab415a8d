"""The decider <-> NGINX protocol: header names, internal paths, redirect answers (pure).

Every name here is shared with the configuration generator (:mod:`inferoute.integrations.nginx`), which
writes NGINX directives that send, read or strip exactly these headers; the table of what each header means is
in the package docstring.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from inferoute.gateway.proxy import end_to_end_headers
from inferoute.gateway.routing import RoutedRequest

ACCEL_LOCATION = "@inference"
ACCEL_RETRY_LOCATION = "@inference_retry"
RETRIES_HEADER = "X-Inference-Retries"
"""Request header NGINX sends the decider: how many fallbacks its configuration can walk (0 if absent)."""
UPSTREAM_HEADER = "X-Inference-Upstream"
FALLBACK_HEADER = "X-Inference-Fallback-"
FALLBACKS_HEADER = "X-Inference-Fallbacks"
MODEL_HEADER = "X-Inference-Model"
TOKEN_HEADER = "X-Inference-Request-Id"
PASS_HEADER_PREFIX = "X-Inference-Hdr-"

INTERNAL_PREFIX = "/_inferoute/"
DONE_PATH = "/_inferoute/done"
HEALTH_PATH = "/_inferoute/healthz"
METRICS_PATH = "/_inferoute/metrics"

# The completion report's headers (sent by NGINX's post_action location).
REPORT_SERVED = "x-inference-served"
REPORT_STATUS = "x-inference-upstream-status"
REPORT_COMPLETION = "x-inference-completion"
REPORT_CLIENT_STATUS = "x-inference-client-status"
REPORT_HEADER_TIME = "x-inference-header-time"

SYSLOG_MARKER = b"inferoute-report|"
"""Start of a completion report sent by NGINX's access log over syslog (UDP); fields are ``|``-separated:
token, ``$upstream_addr``, ``$upstream_status``, ``$upstream_header_time``, ``$request_completion``,
``$status`` (see :func:`parse_syslog_report`)."""

DEFAULT_MAX_FALLBACKS = 8
"""Upper bound of fallback endpoints announced per decision; NGINX's ``X-Inference-Retries`` lowers it."""


def is_internal_header(name_lower: str) -> bool:
    """True for names of the decider <-> NGINX protocol (``x-inference-*``, ``x-accel-*``)."""
    return name_lower.startswith(("x-inference-", "x-accel-"))


def request_headers_for_decision(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Client headers as the decision core should see them: hop-by-hop (and those named in ``Connection``)
    and the decider protocol's own names removed (a client could send them through NGINX)."""
    return [(k, v) for k, v in end_to_end_headers(headers) if not is_internal_header(k.lower())]


def redirect_headers(
    routed: RoutedRequest, token: str, *, max_fallbacks: int = DEFAULT_MAX_FALLBACKS
) -> dict[str, str]:
    """The headers of a redirect answer for ``routed`` (see the module table). Pure."""
    first, *rest = routed.upstreams
    fallbacks = rest[:max_fallbacks]
    model_header = routed.route.bbr.header_name.lower()
    model = routed.model or ""
    passed: dict[str, str] = {}
    for name, value in routed.set_headers.items():
        if name.lower() == model_header:
            model = value  # BBR's value, or the picker's rewrite of it
        else:
            passed[PASS_HEADER_PREFIX + name.lower()] = value
    out = {
        "X-Accel-Redirect": ACCEL_RETRY_LOCATION if fallbacks else ACCEL_LOCATION,
        UPSTREAM_HEADER: first,
        MODEL_HEADER: model,
        TOKEN_HEADER: token,
    }
    if fallbacks:
        out[FALLBACKS_HEADER] = ",".join(fallbacks)
    for i, value in enumerate(fallbacks, start=1):
        out[f"{FALLBACK_HEADER}{i}"] = value
    out.update(passed)
    return out


def nginx_retries(headers: Mapping[str, str], cap: int) -> int:
    """Fallbacks to announce: NGINX's ``X-Inference-Retries`` (0 when absent or invalid), at most ``cap``."""
    value = headers.get(RETRIES_HEADER, "").strip()
    return min(int(value), cap) if value.isdigit() else 0


def header_variable(name: str) -> str:
    """NGINX's ``$upstream_http_*`` suffix for a response header name (lower case, ``-`` -> ``_``)."""
    return name.lower().replace("-", "_")
