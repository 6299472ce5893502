"""Bearer JWTs from an OAuth2 authorization server, verified with PyJWT.

Keys come from FHIRBRIDGE_AUTH_JWT_JWKS_URL (``jwt.PyJWKClient``: the key set is cached for
five minutes, an unknown ``kid`` refetches it at most once per cool-down, 5 s timeout) or from
FHIRBRIDGE_AUTH_JWT_PUBLIC_KEY (one PEM public key). Never both: that is a start-up error.

What a token must pass (anything else is `TokenRejected` with a category, never the token):

- ``alg`` is one of FHIRBRIDGE_AUTH_JWT_ALGORITHMS (RS256, ES256) *and* matches the key's type.
  So ``alg: none`` and HS256 "signed" with the public key (algorithm confusion) fail, as does
  ES256 presented against an RSA key.
- ``exp`` present and not past; ``nbf``, when present, not in the future (both with
  FHIRBRIDGE_AUTH_JWT_LEEWAY_SECONDS of clock skew); ``aud`` present and containing
  FHIRBRIDGE_AUTH_JWT_AUDIENCE (required configuration); ``iss`` present and equal to
  FHIRBRIDGE_AUTH_JWT_ISSUER when that is set.
- A client id: ``client_id``, else ``azp``, else ``sub``. Scopes: ``scope`` (space-separated,
  RFC 8693 / SMART) or ``scp`` (a list, as Azure AD and Okta send); only fhirbridge's scopes
  are kept.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Final, Literal, Protocol

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from fhirbridge.api.access import SCOPES, Principal
from fhirbridge.auth.config import AuthConfigError
from fhirbridge.settings import Settings

log = logging.getLogger(__name__)

# Header + claims + signature of a real access token are a few hundred bytes; a huge value
# is refused before it is base64-decoded.
MAX_TOKEN_LENGTH: Final = 8192
MAX_CLIENT_ID_LENGTH: Final = 128
JWKS_TIMEOUT_SECONDS: Final = 5.0
JWKS_LIFESPAN_SECONDS: Final = 300.0

Category = Literal[
    "malformed",
    "algorithm",
    "signature",
    "expired",
    "not-yet-valid",
    "audience",
    "issuer",
    "missing-claim",
    "unknown-key",
    "jwks-unavailable",
    "claims",
    "invalid",
]


class TokenRejected(Exception):
    """A bearer token failed verification; `category` says why in one safe word."""

    def __init__(self, category: Category) -> None:
        super().__init__(category)
        self.category: Category = category


class KeySource(Protocol):
    """Where the verification key for a token comes from."""

    def key_for(self, token: str) -> tuple[Any, frozenset[str]]:
        """The key and the algorithms it may verify (raises PyJWTError)."""
        ...


def _algorithm_of(key: Any) -> str | None:
    """The one algorithm of RS256/ES256 a public key can verify, or None."""
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return "ES256"
    return None


class PemKey:
    """One PEM public key (RSA for RS256, P-256 for ES256)."""

    def __init__(self, pem: str, allowed: Iterable[str]) -> None:
        try:
            key = load_pem_public_key(pem.encode("utf-8"))
        except (ValueError, UnsupportedAlgorithm):
            raise AuthConfigError(
                "FHIRBRIDGE_AUTH_JWT_PUBLIC_KEY is not a PEM public key"
            ) from None
        alg = _algorithm_of(key)
        if alg is None or alg not in allowed:
            raise AuthConfigError(
                "FHIRBRIDGE_AUTH_JWT_PUBLIC_KEY must be an RSA key (RS256) or a P-256 key "
                f"(ES256) whose algorithm is in FHIRBRIDGE_AUTH_JWT_ALGORITHMS ({alg or 'none'})"
            )
        self._key = key
        self._algorithms = frozenset({alg})

    def key_for(self, token: str) -> tuple[Any, frozenset[str]]:
        return self._key, self._algorithms


class JwksKeys:
    """Keys from a JWKS URL, cached by PyJWKClient and picked by the token's ``kid``."""

    def __init__(self, url: str, allowed: Iterable[str]) -> None:
        if not url.startswith(("https://", "http://")):
            raise AuthConfigError("FHIRBRIDGE_AUTH_JWT_JWKS_URL must be an http(s) URL")
        self._client = jwt.PyJWKClient(
            url,
            cache_keys=True,
            cache_jwk_set=True,
            lifespan=JWKS_LIFESPAN_SECONDS,
            timeout=JWKS_TIMEOUT_SECONDS,
        )
        self._allowed = frozenset(allowed)

    def key_for(self, token: str) -> tuple[Any, frozenset[str]]:
        signing_key = self._client.get_signing_key_from_jwt(token)
        return signing_key.key, self._allowed & {signing_key.algorithm_name}


class JwtVerifier:
    """Verifies bearer JWTs and turns their claims into a Principal."""

    def __init__(
        self,
        keys: KeySource,
        *,
        audience: str,
        issuer: str = "",
        algorithms: Iterable[str] = ("RS256", "ES256"),
        leeway_seconds: int = 30,
    ) -> None:
        if not audience:
            raise AuthConfigError(
                "bearer JWTs need FHIRBRIDGE_AUTH_JWT_AUDIENCE: a token meant for another "
                "service must not be accepted here"
            )
        self._keys = keys
        self._audience = audience
        self._issuer = issuer
        self._algorithms = frozenset(algorithms)
        self._leeway = leeway_seconds
        self._required = ["exp", "aud", *(["iss"] if issuer else [])]

    @classmethod
    def from_settings(cls, settings: Settings) -> JwtVerifier | None:
        """The verifier the settings ask for, None when no JWT key source is configured."""
        url, pem = settings.auth_jwt_jwks_url, settings.auth_jwt_public_key
        if url and pem:
            raise AuthConfigError(
                "set FHIRBRIDGE_AUTH_JWT_JWKS_URL or FHIRBRIDGE_AUTH_JWT_PUBLIC_KEY, not both"
            )
        keys: KeySource
        if url:
            keys = JwksKeys(url, settings.auth_jwt_algorithms)
        elif pem:
            keys = PemKey(pem, settings.auth_jwt_algorithms)
        else:
            return None
        return cls(
            keys,
            audience=settings.auth_jwt_audience,
            issuer=settings.auth_jwt_issuer,
            algorithms=settings.auth_jwt_algorithms,
            leeway_seconds=settings.auth_jwt_leeway_seconds,
        )

    def verify(self, token: str) -> Principal:
        """The token's principal; raises TokenRejected (category only) when it is not valid."""
        if not token or len(token) > MAX_TOKEN_LENGTH:
            raise TokenRejected("malformed")
        try:
            header = jwt.get_unverified_header(token)
            if header.get("alg") not in self._algorithms:
                raise TokenRejected("algorithm")
            key, algorithms = self._keys.key_for(token)
            if header["alg"] not in algorithms:
                raise TokenRejected("algorithm")
            claims = jwt.decode(
                token,
                key,
                algorithms=sorted(algorithms),
                audience=self._audience,
                issuer=self._issuer or None,
                leeway=self._leeway,
                options={"require": self._required},
            )
        except jwt.PyJWTError as exc:
            raise TokenRejected(_category(exc)) from None
        return _principal(claims)


def _category(exc: jwt.PyJWTError) -> Category:
    """One safe word for a PyJWT error (its message may quote the token: never logged)."""
    mapping: tuple[tuple[type[jwt.PyJWTError], Category], ...] = (
        (jwt.ExpiredSignatureError, "expired"),
        (jwt.ImmatureSignatureError, "not-yet-valid"),
        (jwt.InvalidAudienceError, "audience"),
        (jwt.InvalidIssuerError, "issuer"),
        (jwt.MissingRequiredClaimError, "missing-claim"),
        (jwt.InvalidAlgorithmError, "algorithm"),
        (jwt.InvalidSignatureError, "signature"),
        (jwt.DecodeError, "malformed"),
        (jwt.PyJWKClientConnectionError, "jwks-unavailable"),
        (jwt.PyJWKClientError, "unknown-key"),
        (jwt.InvalidKeyError, "algorithm"),
    )
    for kind, category in mapping:
        if isinstance(exc, kind):
            return category
    return "invalid"


def _principal(claims: dict[str, Any]) -> Principal:
    client_id = next(
        (
            value
            for name in ("client_id", "azp", "sub")
            if isinstance(value := claims.get(name), str) and value
        ),
        None,
    )
    # Logged and audited: short, and no control characters (no forged log lines).
    if client_id is None or len(client_id) > MAX_CLIENT_ID_LENGTH or not client_id.isprintable():
        raise TokenRejected("claims")
    return Principal(client_id, _scopes(claims), "jwt")


def _scopes(claims: dict[str, Any]) -> frozenset[str]:
    raw = claims.get("scope", claims.get("scp", ()))
    if isinstance(raw, str):
        items: Iterable[Any] = raw.split()
    elif isinstance(raw, list):
        items = raw
    else:
        raise TokenRejected("claims")
    return frozenset(s for s in items if isinstance(s, str) and s in SCOPES)
