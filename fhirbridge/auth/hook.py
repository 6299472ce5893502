"""The before_request hook: who is calling, and may they call this route.

Order of decisions for every request:

1. No matched endpoint (404, 405): let through, so routing errors stay what they are.
2. The view declares no Access (fhirbridge.api.access): 403, and an error log naming the
   endpoint. A route nobody decided about is closed, whatever the configuration.
3. No authentication configured at all: the caller is ``UNAUTHENTICATED`` (every scope; the
   server only starts like that on loopback, see bind.py).
4. Public view: let through; the caller is whoever their valid credentials say, else
   ``ANONYMOUS`` (no scopes). Bad credentials on a public view are ignored, not an error.
5. Otherwise authenticate: ``Authorization: Bearer fbk_…`` or ``X-API-Key: fbk_…`` is an API
   key, any other bearer token a JWT; with neither header, the registered credential sources
   (the ops console's session cookie) are asked in order. None → 401 (issue ``login``,
   ``WWW-Authenticate: Bearer realm="fhirbridge"`` plus ``error="invalid_token"`` when a
   credential was sent). Then the scope the route needs for these view args → 403
   (``error="insufficient_scope"``) when the caller lacks it.

The caller is stored as ``flask.g.fhirbridge_principal`` (``current_principal()``). Failures are
logged as a category ("expired", "unknown-api-key", ...), never with the credential.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from flask import Flask, Request, current_app, g, request

from fhirbridge.api.access import UNAUTHENTICATED, Principal, access_of
from fhirbridge.auth.apikeys import ApiKeyVerifier
from fhirbridge.errors import ForbiddenError, UnauthorizedError
from fhirbridge.settings import Settings

if TYPE_CHECKING:
    from fhirbridge.auth.jwt import JwtVerifier

log = logging.getLogger(__name__)

EXTENSION: Final = "fhirbridge.auth"
REALM: Final = "fhirbridge"
API_KEY_HEADER: Final = "X-API-Key"

# The caller of a public route when authentication is on and no valid credential was sent.
ANONYMOUS: Final = Principal("anonymous", frozenset(), "none")

CredentialSource = Callable[[Request], Principal | None]


class _Refused(Exception):
    """A credential was sent and is not valid; `category` is safe to log."""

    def __init__(self, category: str) -> None:
        super().__init__(category)
        self.category = category


class Authenticator:
    """The configured ways in (API keys, JWTs, extra sources) and the checks on each request."""

    def __init__(self, settings: Settings) -> None:
        self._api_keys = ApiKeyVerifier(settings.auth_api_keys)
        self._jwt: JwtVerifier | None = None
        if settings.auth_jwt_jwks_url or settings.auth_jwt_public_key:
            # Only then: PyJWT and cryptography are ~45 ms of every start (issue 6).
            from fhirbridge.auth.jwt import JwtVerifier

            self._jwt = JwtVerifier.from_settings(settings)
        self._sources: list[CredentialSource] = []

    @property
    def enabled(self) -> bool:
        """True when API keys or a JWT key source are configured."""
        return bool(self._api_keys) or self._jwt is not None

    def add_source(self, source: CredentialSource) -> None:
        """Ask `source` for a principal when a request sends neither header."""
        self._sources.append(source)

    def api_key(self, key: str) -> Principal | None:
        """The principal of an API key, or None (e.g. for the console's login form)."""
        return self._api_keys.verify(key)

    def identify(self, req: Request) -> Principal | None:
        """The caller's principal, None when no credential was sent; raises _Refused."""
        authorization = req.headers.get("Authorization")
        api_key = req.headers.get(API_KEY_HEADER)
        if authorization is not None and api_key is not None:
            raise _Refused("two-credentials")
        if api_key is not None:
            return self._by_api_key(api_key.strip())
        if authorization is not None:
            scheme, _, token = authorization.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise _Refused("not-bearer")
            token = token.strip()
            if token.startswith("fbk_"):
                return self._by_api_key(token)
            return self._by_jwt(token)
        for source in self._sources:
            principal = source(req)
            if principal is not None:
                return principal
        return None

    def _by_api_key(self, key: str) -> Principal:
        principal = self._api_keys.verify(key)
        if principal is None:
            raise _Refused("unknown-api-key")
        return principal

    def _by_jwt(self, token: str) -> Principal:
        if self._jwt is None:
            raise _Refused("jwt-not-configured")
        from fhirbridge.auth.jwt import TokenRejected  # loaded with self._jwt

        try:
            return self._jwt.verify(token)
        except TokenRejected as exc:
            raise _Refused(f"jwt-{exc.category}") from None

    def before_request(self) -> None:
        """The hook itself (see the module docstring for the order of decisions)."""
        g.fhirbridge_principal = ANONYMOUS if self.enabled else UNAUTHENTICATED
        endpoint = request.endpoint
        if endpoint is None:
            return
        access = access_of(current_app.view_functions.get(endpoint))
        if access is None:
            log.error("route %s declares no access rule (@requires or @public): refused", endpoint)
            raise ForbiddenError("this route is closed: it declares no access rule")
        if not self.enabled:
            return
        if access.scope is None:
            with contextlib.suppress(_Refused):
                g.fhirbridge_principal = self.identify(request) or ANONYMOUS
            return
        try:
            principal = self.identify(request)
        except _Refused as exc:
            log.warning("authentication refused: %s", exc.category)
            raise UnauthorizedError(
                "the credentials sent were not accepted",
                challenge=f'Bearer realm="{REALM}", error="invalid_token"',
            ) from None
        if principal is None:
            raise UnauthorizedError(
                "authentication required: send an API key (Authorization: Bearer fbk_… or "
                "X-API-Key) or a bearer token",
                challenge=f'Bearer realm="{REALM}"',
            )
        g.fhirbridge_principal = principal
        needed = access.scope_for(request.view_args)
        if needed is not None and not principal.may(needed):
            log.warning("scope refused: client %s lacks %s", principal.client_id, needed)
            raise ForbiddenError(
                f"this client lacks the scope {needed}",
                challenge=f'Bearer realm="{REALM}", error="insufficient_scope", scope="{needed}"',
            )


def init_app(app: Flask, settings: Settings) -> Authenticator:
    """Build the Authenticator from settings and register its hook (call before other hooks)."""
    auth = Authenticator(settings)
    app.extensions[EXTENSION] = auth
    app.before_request(auth.before_request)
    return auth


def authenticator(app: Flask) -> Authenticator:
    """The app's Authenticator (init_app must have run)."""
    try:
        auth: Authenticator = app.extensions[EXTENSION]
    except KeyError:
        raise RuntimeError("fhirbridge.auth.init_app has not run for this app") from None
    return auth


def add_credential_source(app: Flask, source: CredentialSource) -> None:
    """Let `source(request)` identify callers that send neither Authorization nor X-API-Key."""
    authenticator(app).add_source(source)
