"""Outbound auth to hospital FHIR servers: none, static bearer, client_secret_basic, SMART Backend.

Specifications followed (checked against SMART App Launch 2.2.0, STU 2.2):

- Backend Services, https://hl7.org/fhir/smart-app-launch/backend-services.html: the token request
  is a POST (application/x-www-form-urlencoded) of ``scope``, ``grant_type=client_credentials``,
  ``client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer`` and
  ``client_assertion``; the answer has ``access_token``, ``token_type`` ("bearer"),
  ``expires_in`` (SHOULD NOT exceed 300) and ``scope``. Refresh tokens SHOULD NOT be issued:
  "clients can request new access tokens as needed", which is what the cache below does.
- Client Authentication: Asymmetric,
  https://hl7.org/fhir/smart-app-launch/client-confidential-asymmetric.html: JWT header ``alg``
  (the client SHALL support RS384 and ES384), ``kid`` (required, unique within the client's JWK
  Set), ``typ`` fixed "JWT", ``jku`` optional (when present it SHALL match the JWKS URL registered
  with the server); claims ``iss`` = ``sub`` = client_id, ``aud`` = the token URL the JWT is posted
  to, ``exp`` "SHALL be no more than five minutes in the future", ``jti`` a nonce unique to this
  JWT (servers reject a jti seen before for the same iss: replay protection). Each registered JWK
  has ``kty`` and ``kid`` and bare key members (``n``/``e`` for RSA, ``crv``/``x``/``y`` for EC);
  the JWKS URL is public and SHOULD be served with a Cache-Control header
  (``fhirbridge.api.jwks``). Failed client authentication is answered with the OAuth
  ``invalid_client`` error of RFC 6749 §5.2.
- client_secret_basic: RFC 6749 §2.3.1 (client_id and secret are form-urlencoded, then sent as
  HTTP Basic), as in https://hl7.org/fhir/smart-app-launch/client-confidential-symmetric.html
  (Oracle Health system accounts use it; Epic backend apps use SMART Backend Services).
- RFC 7523 §3 (JWT client assertions), RFC 7517 (JWK), RFC 7518 (RS384; ES384 is ECDSA on P-384).

Choices made here:

- Each assertion lives ``ASSERTION_LIFETIME`` = 270 s (``exp`` = ``iat`` + 270): under the 300 s
  ceiling with 30 s for clock skew. No ``nbf``: a server whose clock lags ours would reject it.
  ``jti`` is a fresh uuid4 for every assertion.
- Access tokens are cached per auth object and renewed before expiry, once less than
  ``max(60 s, 10 % of the lifetime)`` is left (at most half the lifetime, so a very short-lived
  token is not re-fetched on every request). One lock per auth object makes the fetch
  single-flight: threaded workers sharing the object wait for one token request.
- A 401 from the FHIR server is handled *inside the auth object* with the requests response-hook
  pattern (as ``requests.auth.HTTPDigestAuth`` does): the token is refreshed once and the request
  re-sent once on the same connection adapter, with the same timeout/verify/proxies; a second 401
  is returned to the caller as is. The client only has to pass ``auth=`` on each call (not
  re-send a PreparedRequest). Not retried: requests whose body is a stream (it cannot be replayed)
  and responses from another origin than the request the token was attached to (a redirect to
  another host never receives a token). ``refresh()`` is public for clients that want to drive
  it themselves. Static bearer tokens cannot be refreshed: their 401 goes back unchanged.
- TLS verification is always on: ``tls_verify(ca_bundle)`` gives requests' ``verify`` (the CA
  bundle path as a string, or True for the default trust store); ``build_auth`` refuses
  ``verify=False`` and a session with ``verify = False``. Token URLs must be https (plain http
  only on a loopback host, for tests); the token request never follows redirects.
- Secrets (client_secret, bearer token, private key, signed assertion, access tokens) are
  ``SecretStr`` or never stored in text form: they appear in no repr, ``model_dump``,
  validation error (``hide_input_in_errors``), log line or ``AuthError`` message. Log lines name
  the token URL and the FHIR server's origin only (a FHIR URL's path and query can carry patient
  identifiers).
"""

from __future__ import annotations

import base64
import functools
import ipaddress
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeAlias
from urllib.parse import quote, urlsplit

import jwt
import requests
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from requests.auth import AuthBase
from requests.cookies import extract_cookies_to_jar
from requests.models import PreparedRequest, Response

from fhirbridge.errors import FhirbridgeError

__all__ = [
    "ASSERTION_LIFETIME",
    "CLIENT_ASSERTION_TYPE",
    "DEFAULT_TIMEOUT",
    "AuthConfig",
    "AuthConfigError",
    "AuthError",
    "BearerAuthConfig",
    "ClientSecretBasicAuth",
    "ClientSecretBasicConfig",
    "EhrAuth",
    "NoAuth",
    "NoAuthConfig",
    "OAuth2ClientCredentialsAuth",
    "SmartBackendAuth",
    "SmartBackendConfig",
    "StaticBearerAuth",
    "build_auth",
    "has_private_members",
    "jwks",
    "parse_auth_config",
    "public_jwk",
    "refresh_margin",
    "tls_verify",
]

log = logging.getLogger(__name__)

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_LIFETIME = 270  # seconds; SMART: exp no more than five minutes in the future
DEFAULT_TIMEOUT: tuple[float, float] = (5.0, 30.0)  # (connect, read) seconds, token endpoint
DEFAULT_EXPIRES_IN = 300  # when a token answer omits expires_in (SMART requires it)
MIN_RSA_BITS = 2048

SmartAlg: TypeAlias = Literal["RS384", "ES384"]
PrivateKey: TypeAlias = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

# RFC 6749 §5.2: error codes are printable ASCII without '"' and '\'.
_ERROR_CODE = re.compile(r"^[\x20\x21\x23-\x5b\x5d-\x7e]{1,64}$")
_PRIVATE_JWK_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


# --------------------------------------------------------------------------- errors


class AuthError(FhirbridgeError):
    """Could not obtain an access token from the target's token endpoint.

    The message names the token URL, the HTTP status (None: no answer) and the OAuth ``error``
    code, never a secret or an assertion. ``retryable`` is True for network errors, 429 and 5xx;
    False for answers that need a configuration change (e.g. 400/401 ``invalid_client``).
    """

    code = "ehr_auth"
    http_status = 502
    issue_code = "security"

    def __init__(
        self,
        token_url: str,
        *,
        status: int | None,
        error: str | None = None,
        description: str | None = None,
    ) -> None:
        self.token_url = token_url
        self.status = status
        self.error = error
        self.description = description
        what = f"HTTP {status}" if status is not None else "no response"
        msg = f"token request to {token_url} failed: {what}"
        if error:
            msg += f", error={error}"
        if description:
            msg += f" ({description})"
        super().__init__(msg)

    @property
    def retryable(self) -> bool:
        return self.status is None or self.status == 429 or self.status >= 500


class AuthConfigError(ValueError):
    """An auth configuration is invalid; the message names fields, never their values."""


# --------------------------------------------------------------------------- configuration


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_token_url(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if not host:
        raise ValueError("must be an absolute https URL")
    if parts.scheme != "https" and not (parts.scheme == "http" and _is_loopback(host)):
        raise ValueError("must use https (plain http is accepted only for a loopback host)")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry credentials (user:password@)")
    if parts.fragment:
        raise ValueError("must not have a fragment")
    return url  # verbatim: SMART's aud must equal the URL the assertion is posted to


class _AuthConfigBase(BaseModel):
    # hide_input_in_errors: a validation error must not echo a secret it was given. A model that
    # embeds an AuthConfig must set it as well: pydantic takes the setting of the outermost model.
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)


class NoAuthConfig(_AuthConfigBase):
    """No Authorization header (open test servers, or auth done by a network layer)."""

    type: Literal["none"] = "none"


class BearerAuthConfig(_AuthConfigBase):
    """A static bearer token issued out of band; it cannot be refreshed."""

    type: Literal["bearer"] = "bearer"
    token: SecretStr = Field(min_length=1)


class ClientSecretBasicConfig(_AuthConfigBase):
    """OAuth2 client_credentials; the client authenticates with HTTP Basic (RFC 6749 §2.3.1)."""

    type: Literal["client_secret_basic"] = "client_secret_basic"
    token_url: str
    client_id: str = Field(min_length=1)
    client_secret: SecretStr = Field(min_length=1)
    scope: str | None = None

    @field_validator("token_url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        return _check_token_url(v)


class SmartBackendConfig(_AuthConfigBase):
    """SMART Backend Services: client_credentials with a private_key_jwt client assertion.

    Exactly one of ``private_key`` (PEM text, e.g. from ``${ENV}``; literal ``\\n`` escapes are
    accepted) and ``private_key_file`` (a PEM file, read when the config is validated and again
    when an auth object or the JWKS is built). The key must match ``alg``: RSA of at least 2048
    bits for RS384, EC on P-384 for ES384. Unencrypted PKCS#8 or traditional PEM.
    """

    type: Literal["smart_backend"] = "smart_backend"
    token_url: str
    client_id: str = Field(min_length=1)
    private_key: SecretStr | None = None
    private_key_file: Path | None = None
    alg: SmartAlg
    kid: str = Field(min_length=1, max_length=256)
    scope: str = Field(min_length=1)
    jku: str | None = None

    @field_validator("token_url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        return _check_token_url(v)

    @field_validator("jku")
    @classmethod
    def _check_jku(cls, v: str | None) -> str | None:
        if v is not None:
            parts = urlsplit(v)
            if parts.scheme != "https" or not parts.hostname:
                raise ValueError("must be an https URL (SMART: a TLS-protected JWKS URL)")
        return v

    @model_validator(mode="after")
    def _check_key(self) -> SmartBackendConfig:
        if (self.private_key is None) == (self.private_key_file is None):
            raise ValueError("set exactly one of private_key and private_key_file")
        self.load_private_key()
        return self

    def load_private_key(self) -> PrivateKey:
        """The private key, checked against ``alg``; errors never quote the key."""
        if self.private_key is not None:
            text = self.private_key.get_secret_value()
            if "\n" not in text and "\\n" in text:
                text = text.replace("\\n", "\n")
            pem = text.strip().encode()
            source = "private_key"
        else:
            assert self.private_key_file is not None
            source = f"private_key_file {self.private_key_file}"
            try:
                pem = self.private_key_file.read_bytes()
            except OSError as exc:
                raise ValueError(f"{source}: cannot read ({type(exc).__name__})") from None
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise ValueError(
                f"{source}: not an unencrypted PEM private key (PKCS#8 or traditional)"
            ) from None
        if self.alg == "RS384":
            if not isinstance(key, rsa.RSAPrivateKey):
                raise ValueError(f"alg RS384 needs an RSA private key; {source} is not RSA")
            if key.key_size < MIN_RSA_BITS:
                raise ValueError(f"{source}: RSA key of {key.key_size} bits; need >= 2048")
        else:
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"alg ES384 needs an EC P-384 private key; {source} is not EC")
            if not isinstance(key.curve, ec.SECP384R1):
                raise ValueError(f"alg ES384 needs curve P-384; {source} is on {key.curve.name}")
        return key


AuthConfig: TypeAlias = Annotated[
    NoAuthConfig | BearerAuthConfig | ClientSecretBasicConfig | SmartBackendConfig,
    Field(discriminator="type"),
]
_AUTH_CONFIG: TypeAdapter[AuthConfig] = TypeAdapter(
    AuthConfig, config=ConfigDict(hide_input_in_errors=True)
)


def parse_auth_config(data: Mapping[str, Any]) -> AuthConfig:
    """Validate one ``auth:`` mapping; raises AuthConfigError naming fields, never values."""
    try:
        return _AUTH_CONFIG.validate_python(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<auth>'}: {err['msg']}"
            for err in exc.errors(include_input=False, include_url=False)
        )
        raise AuthConfigError(f"invalid auth configuration: {problems}") from None


# --------------------------------------------------------------------------- TLS


def tls_verify(ca_bundle: Path | None = None) -> str | bool:
    """requests' ``verify`` for a target: ``str(ca_bundle)`` (a PEM bundle file, or a directory
    prepared with c_rehash) or True (certifi / REQUESTS_CA_BUNDLE). Never False."""
    if ca_bundle is None:
        return True
    if not ca_bundle.exists():
        raise AuthConfigError(f"ca_bundle {ca_bundle} does not exist")
    return str(ca_bundle)


def _check_verify(verify: str | bool) -> str | bool:
    if verify is False or verify == "":
        raise AuthConfigError("TLS verification cannot be disabled (use a CA bundle instead)")
    return verify


# --------------------------------------------------------------------------- JWKS


def public_jwk(config: SmartBackendConfig) -> dict[str, Any]:
    """The public JWK of one SMART key: kty, n/e or crv/x/y, kid, alg, use, key_ops."""
    public = config.load_private_key().public_key()
    full: dict[str, Any]
    if isinstance(public, rsa.RSAPublicKey):
        full = RSAAlgorithm.to_jwk(public, as_dict=True)
        members: tuple[str, ...] = ("kty", "n", "e")
    else:
        full = ECAlgorithm.to_jwk(public, as_dict=True)
        members = ("kty", "crv", "x", "y")
    jwk = {m: full[m] for m in members}  # whitelist: private members can never slip through
    jwk.update(kid=config.kid, alg=config.alg, use="sig", key_ops=["verify"])
    return jwk


def jwks(configs: Iterable[SmartBackendConfig]) -> dict[str, Any]:
    """The public JWK Set of all SMART private keys, one entry per kid.

    The same key configured for several targets is listed once; two different keys under one
    kid are a configuration error (SMART: kid SHALL be unique within the client's JWK Set).
    """
    keys: dict[str, dict[str, Any]] = {}
    for config in configs:
        jwk = public_jwk(config)
        seen = keys.get(config.kid)
        if seen is not None and seen != jwk:
            raise AuthConfigError(f"kid {config.kid!r} names two different keys")
        keys[config.kid] = jwk
    return {"keys": list(keys.values())}


def has_private_members(jwk_set: Mapping[str, Any]) -> bool:
    """True when any JWK of the set carries private key material (d, p, q, ..., k)."""
    return any(
        isinstance(k, Mapping) and not _PRIVATE_JWK_MEMBERS.isdisjoint(k)
        for k in jwk_set.get("keys", ())
    )


# --------------------------------------------------------------------------- auth objects


def refresh_margin(lifetime: float) -> float:
    """Seconds before expiry at which a token is renewed: max(60, 10 %), at most half of it."""
    return min(max(60.0, 0.1 * lifetime), 0.5 * lifetime)


def _origin(url: str | None) -> tuple[str, str, int | None]:
    parts = urlsplit(url or "")
    port = parts.port or {"https": 443, "http": 80}.get(parts.scheme)
    return parts.scheme, (parts.hostname or ""), port


def _origin_text(url: str | None) -> str:
    scheme, host, port = _origin(url)
    return f"{scheme}://{host}:{port}"


class EhrAuth(AuthBase):
    """What ``build_auth`` returns: a requests auth with an explicit ``refresh()``."""

    def refresh(self, stale: str | None = None) -> None:
        """Renew the credential (no-op unless it comes from a token endpoint)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class NoAuth(EhrAuth):
    """Sends no Authorization header (and shields requests from session auth and .netrc)."""

    def __call__(self, r: PreparedRequest) -> PreparedRequest:
        return r


class StaticBearerAuth(EhrAuth):
    """``Authorization: Bearer <token>`` with a configured token; a 401 is returned as is."""

    def __init__(self, token: SecretStr) -> None:
        self._token = token

    def __call__(self, r: PreparedRequest) -> PreparedRequest:
        r.headers["Authorization"] = f"Bearer {self._token.get_secret_value()}"
        return r


@dataclass(frozen=True, slots=True)
class _Token:
    value: str
    refresh_at: float
    expires_at: float

    def __repr__(self) -> str:
        return f"_Token(refresh_at={self.refresh_at}, expires_at={self.expires_at})"


class OAuth2ClientCredentialsAuth(EhrAuth):
    """OAuth2 client_credentials with a cached access token; subclasses authenticate the client.

    Thread-safe: the token cache and every token request are under one lock.
    """

    def __init__(
        self,
        token_url: str,
        *,
        session: requests.Session,
        clock: Callable[[], float] = time.time,
        verify: str | bool = True,
        timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
    ) -> None:
        self.token_url = token_url
        self._session = session
        self._clock = clock
        self._verify = _check_verify(verify)
        self._timeout = timeout
        self._lock = threading.Lock()
        self._token: _Token | None = None
        self.token_requests = 0  # number of token requests made (for metrics and tests)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(token_url={self.token_url!r})"

    # -- subclass hooks
    def _client_auth(self) -> tuple[dict[str, str], AuthBase, list[str]]:
        """Form fields and requests auth that authenticate the client, plus redactable secrets."""
        raise NotImplementedError

    def _scope(self) -> str | None:
        raise NotImplementedError

    # -- token cache
    def access_token(self) -> str:
        """A valid access token: the cached one, or a new one once it is due for renewal."""
        with self._lock:
            token = self._token
            if token is None or self._clock() >= token.refresh_at:
                token = self._token = self._fetch()
            return token.value

    def refresh(self, stale: str | None = None) -> None:
        """Fetch a new token now, unless the cached one already differs from ``stale`` (another
        thread renewed it after the 401 that prompted this call)."""
        with self._lock:
            if stale is not None and self._token is not None and self._token.value != stale:
                return
            self._token = self._fetch()

    def _refresh_from(self, stale: str) -> str:
        self.refresh(stale)
        with self._lock:
            assert self._token is not None
            return self._token.value

    # -- requests auth protocol
    def __call__(self, r: PreparedRequest) -> PreparedRequest:
        token = self.access_token()
        r.headers["Authorization"] = f"Bearer {token}"
        hook = functools.partial(self._retry_on_401, sent=token, origin=_origin(r.url))
        r.register_hook("response", hook)  # type: ignore[no-untyped-call]
        return r

    def _retry_on_401(
        self,
        resp: Response,
        *,
        sent: str,
        origin: tuple[str, str, int | None],
        **kwargs: Any,
    ) -> Response:
        """Response hook: on a 401 from the origin the token was sent to, renew the token and
        re-send the request once. Runs for the first response only (the retry goes straight to
        the connection adapter, which dispatches no hooks)."""
        request = resp.request
        if resp.status_code != 401 or _origin(request.url) != origin:
            return resp
        if request.body is not None and not isinstance(request.body, bytes | str):
            log.info("401 from %s; body is a stream, not retried", _origin_text(request.url))
            return resp
        log.info("401 from %s; renewing the access token, retrying once", _origin_text(request.url))
        resp.content  # noqa: B018 - read the body so the connection can be reused
        resp.close()
        fresh = self._refresh_from(sent)  # AuthError propagates to the caller
        retry = request.copy()
        jar = getattr(retry, "_cookies", None)  # cookies the 401 set (sticky sessions)
        if jar is not None:
            extract_cookies_to_jar(jar, request, resp.raw)  # type: ignore[no-untyped-call]
            retry.prepare_cookies(jar)
        retry.headers["Authorization"] = f"Bearer {fresh}"
        second = resp.connection.send(retry, **kwargs)
        second.history.append(resp)
        second.request = retry
        return second

    # -- token endpoint
    def _fetch(self) -> _Token:
        form, client_auth, secrets = self._client_auth()
        form = {"grant_type": "client_credentials", **form}
        scope = self._scope()
        if scope:
            form["scope"] = scope
        started = self._clock()
        self.token_requests += 1
        log.debug("requesting an access token from %s", self.token_url)
        try:
            resp = self._session.post(
                self.token_url,
                data=form,
                headers={"Accept": "application/json"},
                auth=client_auth,
                timeout=self._timeout,
                verify=self._verify,
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            reason = _redact(f"{type(exc).__name__}: {exc}", secrets)[:300]
            log.warning("token request to %s failed: %s", self.token_url, type(exc).__name__)
            raise AuthError(self.token_url, status=None, description=reason) from None
        with resp:
            body = _json_or_none(resp)
            if resp.status_code != 200:
                err = self._error(resp.status_code, body, secrets)
                log.warning(
                    "token request to %s failed: HTTP %s error=%s",
                    self.token_url,
                    resp.status_code,
                    err.error,
                )
                raise err
            token = self._parse_token(body, started)
        log.info(
            "access token from %s, valid %.0f s",
            self.token_url,
            token.expires_at - started,
        )
        return token

    def _error(self, status: int, body: Any, secrets: list[str]) -> AuthError:
        error = description = None
        if isinstance(body, dict):
            code = body.get("error")
            if isinstance(code, str) and _ERROR_CODE.match(code):
                error = code
            text = body.get("error_description")
            if isinstance(text, str):
                description = _printable(_redact(text, secrets))[:200] or None
        return AuthError(self.token_url, status=status, error=error, description=description)

    def _parse_token(self, body: Any, started: float) -> _Token:
        def bad(why: str) -> AuthError:
            return AuthError(
                self.token_url, status=200, error="invalid_token_response", description=why
            )

        if not isinstance(body, dict):
            raise bad("not a JSON object")
        value = body.get("access_token")
        if not isinstance(value, str) or not value:
            raise bad("no access_token")
        token_type = body.get("token_type")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise bad("token_type is not bearer")
        expires_in = body.get("expires_in", DEFAULT_EXPIRES_IN)
        if isinstance(expires_in, str) and expires_in.isdigit():
            expires_in = int(expires_in)
        if isinstance(expires_in, bool) or not isinstance(expires_in, int | float):
            raise bad("expires_in is not a number")
        if expires_in <= 0:
            raise bad("expires_in is not positive")
        lifetime = float(expires_in)
        return _Token(
            value=value,
            refresh_at=started + lifetime - refresh_margin(lifetime),
            expires_at=started + lifetime,
        )


class ClientSecretBasicAuth(OAuth2ClientCredentialsAuth):
    """client_credentials, client authenticated with HTTP Basic client_id:client_secret."""

    def __init__(self, config: ClientSecretBasicConfig, **kwargs: Any) -> None:
        super().__init__(config.token_url, **kwargs)
        self._config = config

    def _client_auth(self) -> tuple[dict[str, str], AuthBase, list[str]]:
        secret = self._config.client_secret.get_secret_value()
        return {}, _BasicClientAuth(self._config.client_id, secret), [secret]

    def _scope(self) -> str | None:
        return self._config.scope


class SmartBackendAuth(OAuth2ClientCredentialsAuth):
    """SMART Backend Services: client_credentials with a signed private_key_jwt assertion."""

    def __init__(self, config: SmartBackendConfig, **kwargs: Any) -> None:
        super().__init__(config.token_url, **kwargs)
        self._config = config
        self._key = config.load_private_key()

    def assertion(self) -> str:
        """A new signed client assertion (fresh jti, exp = iat + 270 s)."""
        cfg = self._config
        now = int(self._clock())
        headers: dict[str, Any] = {"kid": cfg.kid, "typ": "JWT"}
        if cfg.jku:
            headers["jku"] = cfg.jku
        claims = {
            "iss": cfg.client_id,
            "sub": cfg.client_id,
            "aud": cfg.token_url,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME,
            "jti": str(uuid.uuid4()),
        }
        return jwt.encode(claims, self._key, algorithm=cfg.alg, headers=headers)

    def _client_auth(self) -> tuple[dict[str, str], AuthBase, list[str]]:
        signed = self.assertion()
        form = {"client_assertion_type": CLIENT_ASSERTION_TYPE, "client_assertion": signed}
        return form, NoAuth(), [signed]

    def _scope(self) -> str | None:
        return self._config.scope


class _BasicClientAuth(AuthBase):
    """HTTP Basic for OAuth clients: both parts form-urlencoded first (RFC 6749 §2.3.1)."""

    def __init__(self, client_id: str, secret: str) -> None:
        raw = f"{quote(client_id, safe='')}:{quote(secret, safe='')}".encode()
        self._header = "Basic " + base64.b64encode(raw).decode("ascii")

    def __call__(self, r: PreparedRequest) -> PreparedRequest:
        r.headers["Authorization"] = self._header
        return r

    def __repr__(self) -> str:
        return "_BasicClientAuth()"


def _json_or_none(resp: Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return None


def _redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if len(secret) >= 4:
            text = text.replace(secret, "[redacted]")
    return text


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else " " for c in text).strip()


# --------------------------------------------------------------------------- factory


def build_auth(
    config: AuthConfig,
    *,
    session: requests.Session,
    clock: Callable[[], float] = time.time,
    verify: str | bool = True,
    timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
) -> EhrAuth:
    """The requests auth for one target.

    ``session`` is used for token requests (pass the target's session: same adapters, proxies
    and pool); ``verify`` is ``tls_verify(target.ca_bundle)`` and is used for token requests
    (the FHIR requests use whatever the client passes); ``clock`` is injectable for tests;
    ``timeout`` bounds each token request. Nothing is fetched until the first request.
    """
    _check_verify(verify)
    if session.verify is False:
        raise AuthConfigError("the session has TLS verification disabled")
    match config:
        case NoAuthConfig():
            return NoAuth()
        case BearerAuthConfig():
            return StaticBearerAuth(config.token)
        case ClientSecretBasicConfig():
            return ClientSecretBasicAuth(
                config, session=session, clock=clock, verify=verify, timeout=timeout
            )
        case SmartBackendConfig():
            return SmartBackendAuth(
                config, session=session, clock=clock, verify=verify, timeout=timeout
            )
    raise TypeError(f"unknown auth config {type(config).__name__}")
