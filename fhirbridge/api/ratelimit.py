"""Per-client rate limit (Flask-Limiter): one budget per caller across every route.

* Who: the authenticated client id (``current_principal().client_id``), else, when nobody
  authenticated (auth off, or an anonymous call of a public route), the remote address. Both
  kinds of key are prefixed (``client:``, ``addr:``) so a client id can never share an
  address's bucket. The hook runs after the authentication hook, so the principal is known;
  requests the authentication hook refuses (401, 403) never reach it.
* What: ``settings.rate_limit`` in the limits notation ("100/second;1200/minute"), one shared
  application-wide bucket per caller, fixed windows; empty disables. Unrouted requests (404,
  405) count too. /healthz and /readyz are exempt: probes must never be throttled.
* Where: ``settings.rate_limit_storage_url``, ``memory://`` (one process) or ``redis://`` (shared
  by every instance and gunicorn worker).
* Over the limit: 429, an OperationOutcome with issue code ``throttled`` and ``Retry-After`` in
  whole seconds. Flask-Limiter raises ``RateLimitExceeded`` (a werkzeug ``TooManyRequests``)
  carrying the response our ``on_breach`` hook made; api/problems.py turns it into the
  OperationOutcome and keeps its Retry-After.

When the storage fails (Redis down, timing out) the API stays up: the limiter logs a warning
and counts in this process's memory until the storage answers again (checked with growing
back-off), and an error inside the limiter is logged and the request served. This fails open
on purpose: the limit protects the service's availability, so a Redis outage must not become an
outage of the API that clinics post treatment records to; the per-process counters keep a
(looser: one budget per process) limit in place meanwhile, and the warning says so.
"""

from __future__ import annotations

import logging
import math
import time
import urllib.parse
from typing import TYPE_CHECKING, Final

from flask import Flask, Response, request

from fhirbridge.api import health
from fhirbridge.api.access import current_principal
from fhirbridge.settings import Settings

if TYPE_CHECKING:
    from flask_limiter import Limiter, RequestLimit

__all__ = ["EXTENSION", "KEY_PREFIX", "client_key", "init_app"]

log = logging.getLogger(__name__)

#: app.extensions key of the app's Limiter (absent when rate limiting is off).
EXTENSION: Final = "fhirbridge.ratelimit"
#: Prefix of every counter in the storage (one Redis may serve other applications too).
KEY_PREFIX = "fhirbridge"
# A slow Redis must not hold every request: give up quickly and fall back to memory.
_REDIS_SCHEMES: Final = frozenset({"redis", "rediss", "redis+unix"})
_REDIS_TIMEOUT_SECONDS: Final = 1


def client_key() -> str:
    """The bucket of the current request's caller: its client id, else its address."""
    principal = current_principal()
    if principal.method != "none":
        return f"client:{principal.client_id}"
    return f"addr:{request.remote_addr or 'unknown'}"


def _retry_after(limit: RequestLimit) -> Response:
    """on_breach: a response that only carries Retry-After (whole seconds, at least 1)."""
    try:
        seconds = math.ceil(limit.window[0] - time.time())
    except Exception as exc:  # the storage failed between the hit and this call
        log.warning("rate-limit storage error reading the window: %s", type(exc).__name__)
        seconds = limit.limit.get_expiry()
    return Response(status=429, headers={"Retry-After": str(max(1, seconds))})


def _storage_options(url: str) -> dict[str, str | int]:
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme in _REDIS_SCHEMES:
        return {
            "socket_connect_timeout": _REDIS_TIMEOUT_SECONDS,
            "socket_timeout": _REDIS_TIMEOUT_SECONDS,
        }
    return {}


def init_app(app: Flask, settings: Settings) -> Limiter | None:
    """Rate-limit every route but the probes (call after the authentication hook)."""
    spec = settings.rate_limit.strip()
    if not spec:
        return None
    # Imported only when a limit is set: Flask-Limiter and limits are ~35-80 ms of start-up.
    from flask_limiter import ApplicationLimit, Limiter
    from limits import parse_many

    parse_many(spec)  # a typo in the notation stops start-up, not the first request
    limiter = Limiter(
        client_key,
        application_limits=[
            ApplicationLimit(
                spec,
                error_message=f"too many requests: the limit is {spec} per client; retry "
                "after the number of seconds in the Retry-After header",
            )
        ],
        storage_uri=settings.rate_limit_storage_url,
        storage_options=_storage_options(settings.rate_limit_storage_url),
        strategy="fixed-window",
        key_prefix=KEY_PREFIX,
        # X-RateLimit-* would also put Retry-After on every answer; ours is on the 429 only.
        headers_enabled=False,
        on_breach=_retry_after,
        in_memory_fallback_enabled=True,
        swallow_errors=True,
        # Flask-Limiter skips requests without an endpoint; count 404 and 405 as well.
        request_identifier=lambda: request.endpoint or "unrouted",
    )
    limiter.exempt(health.healthz)
    limiter.exempt(health.readyz)
    limiter.init_app(app)
    app.extensions[EXTENSION] = limiter
    if not limiter.storage.check():
        log.warning(
            "rate-limit storage unreachable at start-up: counting per process until it answers"
        )
    return limiter
