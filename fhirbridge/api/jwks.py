"""GET <path>: our public JWK Set, which hospitals register for SMART Backend Services.

SMART (client-confidential-asymmetric) asks for a TLS-protected JWKS URL reachable without
authentication, and that the client SHOULD send a Cache-Control header with it: here
``max-age=300``, so a rotated key is picked up within five minutes. The set comes from
``keys_provider`` (normally ``fhirbridge.ehr.auth.jwks`` over the configured SMART targets);
a set that carries private key material is refused with a 500 (an OperationOutcome, as every
error) instead of being published.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response

from fhirbridge.api.access import public
from fhirbridge.api.http import json_response
from fhirbridge.errors import FhirbridgeError

DEFAULT_PATH = "/.well-known/jwks.json"
CACHE_CONTROL = "max-age=300"

log = logging.getLogger(__name__)


def make_blueprint(path: str, keys_provider: Callable[[], dict[str, Any]]) -> Blueprint:
    """A blueprint serving ``keys_provider()`` (called per request) as application/json at
    ``path`` (``DEFAULT_PATH`` unless configured otherwise)."""
    if not path.startswith("/"):
        raise ValueError(f"JWKS path must start with '/': {path!r}")
    bp = Blueprint("jwks", __name__)

    @public
    def serve_jwks() -> Response:
        # Here: fhirbridge.ehr.auth brings PyJWT, requests and cryptography, which a service
        # without SMART targets need not load at start-up (issue 6).
        from fhirbridge.ehr.auth import has_private_members

        body = keys_provider()
        if has_private_members(body):
            log.error("refusing to publish a JWK Set that holds private key material")
            raise FhirbridgeError()  # a 500 OperationOutcome, like every other error
        return json_response(body, headers={"Cache-Control": CACHE_CONTROL})

    bp.add_url_rule(path, endpoint="jwks", view_func=serve_jwks, methods=["GET"])
    return bp
