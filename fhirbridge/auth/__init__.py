"""Inbound authentication and authorization: API keys, bearer JWTs, scopes per route.

Public API:

- ``init_app(app, settings)``: register the before_request hook (first, before other hooks).
- ``authenticator(app)``: the app's ``Authenticator`` (``.api_key(key)`` checks a pasted key).
- ``add_credential_source(app, fn)``: ``fn(request) -> Principal | None`` is asked when a
  request sends neither Authorization nor X-API-Key (the ops console's session cookie).
- ``auth_configured(settings)`` and ``check_bind(binds, auth_configured)``: authentication
  may be off only on loopback (``fhirbridge serve`` and ``fhirbridge.gunicorn_conf``).

Scopes and the route decorators live in fhirbridge.api.access; settings in fhirbridge.settings.
"""

from __future__ import annotations

from fhirbridge.auth.bind import BindRefused, check_bind
from fhirbridge.auth.config import AuthConfigError, auth_configured
from fhirbridge.auth.hook import (
    ANONYMOUS,
    Authenticator,
    CredentialSource,
    add_credential_source,
    authenticator,
    init_app,
)

__all__ = [
    "ANONYMOUS",
    "AuthConfigError",
    "Authenticator",
    "BindRefused",
    "CredentialSource",
    "add_credential_source",
    "auth_configured",
    "authenticator",
    "check_bind",
    "init_app",
]
