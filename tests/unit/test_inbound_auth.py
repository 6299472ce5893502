"""Inbound auth, pure parts: API keys, JWT verification (PEM and a real JWKS server), bind rule."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fhirbridge.auth import AuthConfigError, BindRefused, apikeys, auth_configured, check_bind
from fhirbridge.auth.apikeys import ApiKeyVerifier, entry, hash_key, new_key
from fhirbridge.auth.bind import host_of, is_loopback
from fhirbridge.auth.jwt import JwksKeys, JwtVerifier, PemKey, TokenRejected
from fhirbridge.settings import ApiKey, Settings

AUD = "https://fhirbridge.example/api"
ISS = "https://idp.example"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def _pem(private: Any) -> str:
    return (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def _claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISS,
        "aud": AUD,
        "exp": now + 300,
        "iat": now,
        "client_id": "ehr-import",
        "scope": "fhir.read openid",
    }
    for name, value in over.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forge(header: dict[str, Any], claims: dict[str, Any], sign: Any = None) -> str:
    """A token PyJWT would refuse to make: alg none, or HS256 keyed with the public PEM."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = sign(signing_input.encode()) if sign else b""
    return f"{signing_input}.{_b64(signature)}"


def _verifier(pem: str | None = None, **kw: Any) -> JwtVerifier:
    keys = PemKey(pem or _pem(RSA_KEY), kw.pop("algorithms", ("RS256", "ES256")))
    return JwtVerifier(keys, audience=kw.pop("audience", AUD), issuer=kw.pop("issuer", ISS), **kw)


def _rejected(verifier: JwtVerifier, token: str) -> str:
    with pytest.raises(TokenRejected) as info:
        verifier.verify(token)
    return info.value.category


# --- API keys -------------------------------------------------------------------------------


def test_new_key_is_prefixed_256_bit_and_hashed_with_sha256() -> None:
    key = new_key()
    assert key.startswith("fbk_")
    assert len(base64.urlsafe_b64decode(key[4:] + "=")) == 32
    assert new_key() != key
    assert hash_key(key) == hashlib.sha256(key.encode()).hexdigest()


def test_entry_is_a_valid_settings_entry_and_rejects_bad_input() -> None:
    key = new_key()
    made = entry(key, "lab-1", ["fhir.read", "submissions.write", "fhir.read"])
    assert made == {
        "client_id": "lab-1",
        "sha256": hash_key(key),
        "scopes": ["fhir.read", "submissions.write"],
    }
    assert Settings(auth_api_keys=[made]).auth_api_keys[0].sha256 == hash_key(key)
    with pytest.raises(ValueError, match="must start with 'fbk_'"):
        entry("not-a-key", "lab-1", ["fhir.read"])
    with pytest.raises(ValueError):
        entry(key, "bad id with spaces", ["fhir.read"])
    with pytest.raises(ValueError):
        entry(key, "lab-1", ["admin"])


def test_verifier_finds_the_right_entry_and_allows_rotation() -> None:
    old, new, other = new_key(), new_key(), new_key()
    verifier = ApiKeyVerifier(
        [
            ApiKey(client_id="lab", sha256=hash_key(old), scopes=("submissions.write",)),
            ApiKey(client_id="lab", sha256=hash_key(new), scopes=("submissions.write",)),
            ApiKey(client_id="ops", sha256=hash_key(other), scopes=("sync.admin", "fhir.read")),
        ]
    )
    for key in (old, new):
        principal = verifier.verify(key)
        assert principal is not None and principal.client_id == "lab"
        assert principal.scopes == {"submissions.write"} and principal.method == "api-key"
    ops = verifier.verify(other)
    assert ops is not None and ops.client_id == "ops" and ops.scopes == {"sync.admin", "fhir.read"}
    assert verifier.verify(new_key()) is None
    assert verifier.verify(old[:-1]) is None
    assert verifier.verify("fbk_" + "a" * 200) is None  # too long: not even hashed
    assert verifier.verify(hash_key(old)) is None  # the digest is not a key


def test_verifier_compares_every_entry_without_early_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = [new_key() for _ in range(5)]
    verifier = ApiKeyVerifier(
        [ApiKey(client_id=f"c{i}", sha256=hash_key(k)) for i, k in enumerate(keys)]
    )
    calls: list[str] = []
    original = hmac.compare_digest

    def counting(a: str, b: str) -> bool:
        calls.append(b)
        return original(a, b)

    monkeypatch.setattr(apikeys.hmac, "compare_digest", counting)
    for key in (keys[0], keys[4], new_key()):
        calls.clear()
        verifier.verify(key)
        assert len(calls) == 5


def test_the_same_key_twice_is_a_configuration_error() -> None:
    digest = hash_key(new_key())
    with pytest.raises(AuthConfigError, match="same key"):
        ApiKeyVerifier([ApiKey(client_id="a", sha256=digest), ApiKey(client_id="b", sha256=digest)])


# --- JWTs with a PEM key ----------------------------------------------------------------------


def test_valid_rs256_and_es256_tokens_give_a_principal() -> None:
    principal = _verifier().verify(jwt.encode(_claims(), RSA_KEY, algorithm="RS256"))
    assert principal.client_id == "ehr-import"
    assert principal.scopes == {"fhir.read"}  # only fhirbridge scopes are kept
    assert principal.method == "jwt"
    es = _verifier(_pem(EC_KEY)).verify(
        jwt.encode(_claims(scope=None, scp=["sync.admin", "x"]), EC_KEY, algorithm="ES256")
    )
    assert es.scopes == {"sync.admin"}


@pytest.mark.parametrize(
    ("claims", "client_id"),
    [
        ({"client_id": None, "azp": "azp-app", "sub": "user-1"}, "azp-app"),
        ({"client_id": None, "sub": "svc-1"}, "svc-1"),
        ({"client_id": "cid", "azp": "azp-app", "sub": "user-1"}, "cid"),
    ],
)
def test_client_id_comes_from_client_id_then_azp_then_sub(claims: Any, client_id: str) -> None:
    token = jwt.encode(_claims(**claims), RSA_KEY, algorithm="RS256")
    assert _verifier().verify(token).client_id == client_id


def test_alg_none_and_hs256_with_the_public_key_are_refused() -> None:
    verifier = _verifier()
    assert _rejected(verifier, _forge({"alg": "none", "typ": "JWT"}, _claims())) == "algorithm"
    pem_bytes = _pem(RSA_KEY).encode()
    confused = _forge(
        {"alg": "HS256", "typ": "JWT"},
        _claims(),
        lambda data: hmac.new(pem_bytes, data, hashlib.sha256).digest(),
    )
    assert _rejected(verifier, confused) == "algorithm"


def test_an_algorithm_that_does_not_match_the_key_type_is_refused() -> None:
    es_token = jwt.encode(_claims(), EC_KEY, algorithm="ES256")
    assert _rejected(_verifier(), es_token) == "algorithm"  # RSA key configured
    rs512 = jwt.encode(_claims(), RSA_KEY, algorithm="RS512")
    assert _rejected(_verifier(), rs512) == "algorithm"


@pytest.mark.parametrize(
    ("claims", "category"),
    [
        ({"exp": int(time.time()) - 120}, "expired"),
        ({"exp": None}, "missing-claim"),
        ({"nbf": int(time.time()) + 600}, "not-yet-valid"),
        ({"aud": "https://other.example"}, "audience"),
        ({"aud": None}, "missing-claim"),
        ({"iss": "https://evil.example"}, "issuer"),
        ({"iss": None}, "missing-claim"),
        ({"client_id": None}, "claims"),
        ({"client_id": "app\nforged log line"}, "claims"),
        ({"client_id": "x" * 129}, "claims"),
        ({"scope": 42}, "claims"),
    ],
)
def test_claims_are_checked(claims: dict[str, Any], category: str) -> None:
    token = jwt.encode(_claims(**claims), RSA_KEY, algorithm="RS256")
    assert _rejected(_verifier(), token) == category


def test_leeway_allows_small_clock_skew_only() -> None:
    late = jwt.encode(_claims(exp=int(time.time()) - 10), RSA_KEY, algorithm="RS256")
    assert _verifier(leeway_seconds=30).verify(late).client_id == "ehr-import"
    assert _rejected(_verifier(leeway_seconds=0), late) == "expired"


def test_issuer_is_optional_when_not_configured() -> None:
    token = jwt.encode(_claims(iss=None), RSA_KEY, algorithm="RS256")
    assert _verifier(issuer="").verify(token).client_id == "ehr-import"


def test_wrong_signature_and_garbage_are_refused() -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert _rejected(_verifier(), jwt.encode(_claims(), other, algorithm="RS256")) == "signature"
    assert _rejected(_verifier(), "not.a.jwt") == "malformed"
    assert _rejected(_verifier(), "x" * 10_000) == "malformed"
    assert _rejected(_verifier(), "") == "malformed"


def test_bad_jwt_configuration_is_refused_at_start_up() -> None:
    with pytest.raises(AuthConfigError, match="AUDIENCE"):
        _verifier(audience="")
    with pytest.raises(AuthConfigError, match="not a PEM public key"):
        PemKey("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n", ("RS256",))
    with pytest.raises(AuthConfigError, match="P-256"):
        PemKey(_pem(ec.generate_private_key(ec.SECP384R1())), ("RS256", "ES256"))
    with pytest.raises(AuthConfigError, match="RS256"):
        PemKey(_pem(RSA_KEY), ("ES256",))
    both = Settings(
        auth_jwt_jwks_url="https://idp.example/jwks",
        auth_jwt_public_key=_pem(RSA_KEY),
        auth_jwt_audience=AUD,
    )
    with pytest.raises(AuthConfigError, match="not both"):
        JwtVerifier.from_settings(both)
    assert JwtVerifier.from_settings(Settings()) is None
    assert not auth_configured(Settings())
    assert auth_configured(Settings(auth_jwt_public_key=_pem(RSA_KEY), auth_jwt_audience=AUD))


# --- JWTs with a JWKS URL (a real HTTP server on loopback) ------------------------------------


class _JwksServer(http.server.ThreadingHTTPServer):
    body: bytes = b""
    hits: int = 0


class _JwksHandler(http.server.BaseHTTPRequestHandler):
    server: _JwksServer

    def do_GET(self) -> None:
        self.server.hits += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.server.body)))
        self.end_headers()
        self.wfile.write(self.server.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def jwks_server() -> Iterator[_JwksServer]:
    server = _JwksServer(("127.0.0.1", 0), _JwksHandler)
    rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(RSA_KEY.public_key()))
    ec_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(EC_KEY.public_key()))
    server.body = json.dumps(
        {"keys": [{**rsa_jwk, "kid": "r1", "use": "sig"}, {**ec_jwk, "kid": "e1", "use": "sig"}]}
    ).encode()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_jwks_keys_are_fetched_once_and_picked_by_kid(jwks_server: _JwksServer) -> None:
    url = f"http://127.0.0.1:{jwks_server.server_address[1]}/jwks"
    verifier = JwtVerifier(JwksKeys(url, ("RS256", "ES256")), audience=AUD, issuer=ISS)
    rs = jwt.encode(_claims(), RSA_KEY, algorithm="RS256", headers={"kid": "r1"})
    es = jwt.encode(_claims(client_id="ec"), EC_KEY, algorithm="ES256", headers={"kid": "e1"})
    assert verifier.verify(rs).client_id == "ehr-import"
    assert verifier.verify(es).client_id == "ec"
    assert verifier.verify(rs).client_id == "ehr-import"
    assert jwks_server.hits == 1  # cached
    # a token naming the RSA key but claiming ES256 is refused (algorithm confusion via kid)
    crossed = jwt.encode(_claims(), EC_KEY, algorithm="ES256", headers={"kid": "r1"})
    assert _rejected(verifier, crossed) == "algorithm"
    unknown = jwt.encode(_claims(), RSA_KEY, algorithm="RS256", headers={"kid": "nope"})
    assert _rejected(verifier, unknown) == "unknown-key"
    assert _rejected(verifier, unknown) == "unknown-key"
    assert jwks_server.hits <= 2  # an unknown kid refetches at most once per cool-down


def test_unreachable_jwks_is_its_own_category() -> None:
    verifier = JwtVerifier(
        JwksKeys("http://127.0.0.1:9/jwks", ("RS256",)), audience=AUD, issuer=ISS
    )
    token = jwt.encode(_claims(), RSA_KEY, algorithm="RS256", headers={"kid": "r1"})
    assert _rejected(verifier, token) == "jwks-unavailable"


def test_jwks_url_must_be_http() -> None:
    with pytest.raises(AuthConfigError, match="http"):
        JwksKeys("file:///etc/passwd", ("RS256",))


# --- the loopback rule --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bind", "host"),
    [
        ("127.0.0.1:8080", "127.0.0.1"),
        ("[::1]:8080", "::1"),
        ("::1", "::1"),
        ("localhost:80", "localhost"),
        ("0.0.0.0:8080", "0.0.0.0"),
        (":8080", ""),
        ("example.org", "example.org"),
        ("unix:/run/fhirbridge.sock", None),
        ("fd://3", None),
    ],
)
def test_host_of_gunicorn_binds(bind: str, host: str | None) -> None:
    assert host_of(bind) == host


@pytest.mark.parametrize(
    ("bind", "loopback"),
    [
        ("127.0.0.1:8080", True),
        ("127.8.9.10:8080", True),
        ("[::1]:8080", True),
        ("LOCALHOST:8080", True),
        ("0.0.0.0:8080", False),
        ("[::]:8080", False),
        (":8080", False),
        ("10.0.0.5:8080", False),
        ("myhost:8080", False),
        ("unix:/run/fhirbridge.sock", False),
        ("fd://3", False),
    ],
)
def test_is_loopback(bind: str, loopback: bool) -> None:
    assert is_loopback(bind) is loopback


def test_check_bind() -> None:
    warning = check_bind(["127.0.0.1:8080", "[::1]:8080"], auth_configured=False)
    assert warning is not None and "AUTHENTICATION IS OFF" in warning
    assert "127.0.0.1:8080, [::1]:8080" in warning
    assert all(line.startswith("WARNING") for line in warning.splitlines())
    assert check_bind(["0.0.0.0:8080"], auth_configured=True) is None
    assert check_bind(["127.0.0.1:8080"], auth_configured=True) is None
    with pytest.raises(BindRefused, match=r"refusing to serve 0\.0\.0\.0:8080 without auth"):
        check_bind(["127.0.0.1:8080", "0.0.0.0:8080"], auth_configured=False)
    with pytest.raises(BindRefused):
        check_bind([], auth_configured=False)
