"""Browser sessions of the ops console: a signed cookie that names an API key, and CSRF tokens.

Ops sign in by pasting an API key once; the cookie then holds the key's client id and SHA-256
(never the key), an absolute expiry and a CSRF token, signed with FHIRBRIDGE_UI_SESSION_SECRET.
Every request re-checks the hash against the configured keys, so removing a key ends its
sessions. The cookie is HttpOnly, SameSite=Strict, Secure over https and sent only under /ui:
it never authenticates a call to /api or /fhir.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from flask import Flask, Request, has_request_context, request, session
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface, SessionMixin
from itsdangerous import BadSignature, URLSafeTimedSerializer

from fhirbridge.api.access import Principal
from fhirbridge.errors import BadRequestError
from fhirbridge.settings import ApiKey

log = logging.getLogger(__name__)

COOKIE_NAME: Final = "fhirbridge_console"
LIFETIME: Final = timedelta(hours=8)
CSRF_FIELD: Final = "csrf"
# session keys
_CLIENT, _KEY_HASH, _EXPIRES, _CSRF = "cid", "kh", "exp", "csrf"


def key_sha256(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def session_key(secret: str) -> bytes:
    """The signing key: the configured secret, else a random one for this process (warned)."""
    if secret:
        return secret.encode("utf-8")
    log.warning(
        "FHIRBRIDGE_UI_SESSION_SECRET is not set: ops-console sessions are signed with a random "
        "key of this process (they end when it restarts and are not shared between processes)"
    )
    return secrets.token_bytes(32)


class ConsoleSessionInterface(SecureCookieSessionInterface):
    """Flask's signed-cookie sessions, with the console's own key, cookie and fixed expiry."""

    salt = "fhirbridge-ui-session"

    def __init__(self, key: bytes) -> None:
        self._key = key

    def get_signing_serializer(self, app: Flask) -> URLSafeTimedSerializer:
        return URLSafeTimedSerializer(
            self._key,
            salt=self.salt,
            serializer=self.serializer,
            signer_kwargs={
                "key_derivation": self.key_derivation,
                "digest_method": self.digest_method,
            },
        )

    def open_session(self, app: Flask, request: Request) -> SecureCookieSession:
        raw = request.cookies.get(COOKIE_NAME)
        if not raw:
            return self.session_class()
        try:
            data = self.get_signing_serializer(app).loads(
                raw, max_age=int(LIFETIME.total_seconds())
            )
        except BadSignature:  # tampered, signed by another key, or older than LIFETIME
            return self.session_class()
        return self.session_class(data)

    def get_cookie_name(self, app: Flask) -> str:
        return COOKIE_NAME

    def get_cookie_path(self, app: Flask) -> str:
        root = request.script_root if has_request_context() else ""
        return f"{root}/ui"

    def get_cookie_domain(self, app: Flask) -> None:
        return None  # host-only

    def get_cookie_httponly(self, app: Flask) -> bool:
        return True

    def get_cookie_samesite(self, app: Flask) -> str:
        return "Strict"

    def get_cookie_secure(self, app: Flask) -> bool:
        return has_request_context() and request.is_secure

    def get_expiration_time(self, app: Flask, session: SessionMixin) -> datetime | None:
        expires = session.get(_EXPIRES)
        if isinstance(expires, int):
            return datetime.fromtimestamp(expires, UTC)
        return datetime.now(UTC) + LIFETIME

    def should_set_cookie(self, app: Flask, session: SessionMixin) -> bool:
        return session.modified  # no sliding refresh: a login lasts LIFETIME, not longer


# --------------------------------------------------------------------------- login state


def sign_in(principal: Principal, key: str, *, now: float | None = None) -> None:
    """Start a console session for the key's client (the key itself is not kept)."""
    session.clear()
    session[_CLIENT] = principal.client_id
    session[_KEY_HASH] = key_sha256(key)
    session[_EXPIRES] = int((now if now is not None else time.time()) + LIFETIME.total_seconds())
    session[_CSRF] = secrets.token_urlsafe(32)
    session.permanent = True


def sign_out() -> None:
    session.clear()


def signed_in_client() -> str | None:
    client = session.get(_CLIENT)
    return client if isinstance(client, str) else None


def principal_from_keys(keys: Iterable[ApiKey], *, now: float | None = None) -> Principal | None:
    """The principal of this request's console session, if it names a key still configured."""
    client, digest, expires = session.get(_CLIENT), session.get(_KEY_HASH), session.get(_EXPIRES)
    if not (isinstance(client, str) and isinstance(digest, str) and isinstance(expires, int)):
        return None
    if expires <= (now if now is not None else time.time()):
        return None
    for key in keys:
        if key.client_id == client and hmac.compare_digest(key.sha256, digest):
            return Principal(client, frozenset(key.scopes), "console")
    return None


def credential_source(keys: Iterable[ApiKey]) -> Callable[[Request], Principal | None]:
    """fn(request) for fhirbridge.auth: the console session's principal, on /ui routes only."""
    configured = tuple(keys)

    def from_console_session(req: Request) -> Principal | None:
        if req.blueprint != "ui":
            return None
        return principal_from_keys(configured)

    return from_console_session


# --------------------------------------------------------------------------- CSRF


def csrf_token() -> str:
    """This session's CSRF token for a form (made on first use, e.g. without authentication)."""
    token = session.get(_CSRF)
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        session[_CSRF] = token
    return token


def check_csrf(form: Any) -> None:
    """400 unless the form carries this session's CSRF token."""
    expected, given = session.get(_CSRF), form.get(CSRF_FIELD)
    if not (
        isinstance(expected, str)
        and isinstance(given, str)
        and hmac.compare_digest(expected.encode(), given.encode())
    ):
        raise BadRequestError("missing or stale form token: reload the page and try again")
