"""Outbound auth (fhirbridge.ehr.auth) against a real token endpoint and FHIR endpoint on loopback.

``FakeEhr`` is a werkzeug WSGI app run by ``make_server`` in a thread: POST /auth/token acts as a
SMART Backend Services (or client_secret_basic) token endpoint that verifies each client assertion
with the public key published by ``jwks(...)``; /fhir/... accepts only the bearer tokens it issued
and not revoked. Nothing in requests is mocked; time is an injected fake clock shared by client
and server.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import ipaddress
import logging
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import jwt
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from flask import Flask
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError
from werkzeug.serving import BaseWSGIServer, make_server
from werkzeug.wrappers import Request, Response

from fhirbridge.api.jwks import DEFAULT_PATH, make_blueprint
from fhirbridge.ehr.auth import (
    ASSERTION_LIFETIME,
    CLIENT_ASSERTION_TYPE,
    AuthConfig,
    AuthConfigError,
    AuthError,
    BearerAuthConfig,
    ClientSecretBasicConfig,
    NoAuthConfig,
    OAuth2ClientCredentialsAuth,
    SmartBackendConfig,
    build_auth,
    jwks,
    parse_auth_config,
    refresh_margin,
    tls_verify,
)

CLIENT_ID = "fhirbridge-test-client"
SCOPE = "system/Observation.write system/Patient.read"
SENTINEL = "SENTINEL-s3cr3t-9f1c2e"  # a client secret / bearer token that must never leak
PATIENT = b'{"resourceType":"Patient","id":"p1"}'
BAD = "invalid_token_response"


# --------------------------------------------------------------------------- keys


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


@pytest.fixture(scope="module")
def rsa_pem() -> str:
    return _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture(scope="module")
def ec_pem() -> str:
    return _pem(ec.generate_private_key(ec.SECP384R1()))


def _pem_body(pem: str) -> str:
    """A line of the PEM's base64 body: if it shows up anywhere, the key leaked."""
    return pem.splitlines()[2]


# --------------------------------------------------------------------------- fake EHR


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeEhr:
    """Token endpoint (SMART or client_secret_basic) plus a bearer-protected FHIR endpoint."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.base = ""
        self.mode = "smart"  # or "basic"
        self.jwks: dict[str, Any] = {"keys": []}
        self.basic_secret = SENTINEL
        self.expected_scope: str | None = SCOPE
        self.expires_in: Any = 300
        self.token_delay = 0.0
        self.fail: tuple[int, dict[str, Any] | str] | None = None
        self.always_401 = False
        self.lock = threading.Lock()
        self.token_requests: list[dict[str, str]] = []
        self.assertions: list[tuple[dict[str, Any], dict[str, Any]]] = []
        self.raw_assertions: list[str] = []
        self.jtis: set[str] = set()
        self.issued: list[str] = []
        self.revoked: set[str] = set()
        self.rejections: list[str] = []
        self.fhir_requests: list[tuple[str | None, bytes]] = []

    @property
    def token_url(self) -> str:
        return f"{self.base}/auth/token"

    def fhir(self, path: str = "Patient/p1") -> str:
        return f"{self.base}/fhir/{path}"

    # -- WSGI
    def __call__(self, environ: Any, start_response: Any) -> Any:
        request = Request(environ)
        if request.path == "/auth/token" and request.method == "POST":
            response = self._token(request)
        elif request.path == "/fhir/redirect-elsewhere":
            port = request.host.rsplit(":", 1)[1]
            response = Response(status=302, headers={"Location": f"http://localhost:{port}/fhir/x"})
        elif request.path.startswith("/fhir/"):
            response = self._fhir(request)
        else:
            response = Response(status=404)
        return response(environ, start_response)

    def _oauth_error(self, why: str, status: int = 400) -> Response:
        with self.lock:
            self.rejections.append(why)
        return Response(
            f'{{"error":"invalid_client","error_description":"{why}"}}',
            status=status,
            mimetype="application/json",
        )

    def _token(self, request: Request) -> Response:
        form = request.form.to_dict()
        with self.lock:
            self.token_requests.append(form)
        if self.token_delay:
            time.sleep(self.token_delay)
        if self.fail is not None:
            status, body = self.fail
            text = body if isinstance(body, str) else _json(body)
            return Response(text, status=status, mimetype="application/json")
        if form.get("grant_type") != "client_credentials":
            return self._oauth_error("grant_type")
        if form.get("scope") != self.expected_scope:
            return self._oauth_error("scope")
        why = self._check_basic(request) if self.mode == "basic" else self._check_smart(form)
        if why:
            return self._oauth_error(why)
        token = f"at-{uuid.uuid4().hex}"
        with self.lock:
            self.issued.append(token)
        body = {"access_token": token, "token_type": "bearer", "expires_in": self.expires_in}
        return Response(_json({**body, "scope": SCOPE}), mimetype="application/json")

    def _check_basic(self, request: Request) -> str | None:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return "no Basic header"
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        if (unquote(user), unquote(password)) != (CLIENT_ID, self.basic_secret):
            return "bad client credentials"
        return None

    def _check_smart(self, form: dict[str, str]) -> str | None:
        if form.get("client_assertion_type") != CLIENT_ASSERTION_TYPE:
            return "client_assertion_type"
        if "client_secret" in form:
            return "unexpected client_secret"
        assertion = form.get("client_assertion", "")
        with self.lock:
            self.raw_assertions.append(assertion)
        header = jwt.get_unverified_header(assertion)
        if header.get("typ") != "JWT" or header.get("alg") not in ("RS384", "ES384"):
            return "header typ/alg"
        # SMART signature verification step 3: exactly one key with this kid and a kty that
        # fits the alg.
        kty = "RSA" if header["alg"] == "RS384" else "EC"
        candidates = [
            k for k in self.jwks["keys"] if k["kid"] == header.get("kid") and k["kty"] == kty
        ]
        if len(candidates) != 1:
            return "no key for kid"
        key = jwt.PyJWK(candidates[0], algorithm=header["alg"])
        try:
            claims = jwt.decode(
                assertion,
                key,
                algorithms=[header["alg"]],
                audience=self.token_url,
                issuer=CLIENT_ID,
                options={
                    "require": ["iss", "sub", "aud", "exp", "iat", "jti"],
                    "verify_exp": False,  # checked below against the shared fake clock
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
        except jwt.InvalidTokenError as exc:
            return f"assertion: {type(exc).__name__}"
        now = self.clock()
        if claims["sub"] != CLIENT_ID:
            return "sub"
        if not claims["exp"] - claims["iat"] <= 300 or not now < claims["exp"] <= now + 300:
            return "exp"
        with self.lock:
            if claims["jti"] in self.jtis:
                return "jti replayed"
            self.jtis.add(claims["jti"])
            self.assertions.append((header, claims))
        return None

    def _fhir(self, request: Request) -> Response:
        auth = request.headers.get("Authorization")
        with self.lock:
            self.fhir_requests.append((auth, request.get_data()))
        token = auth[7:] if auth and auth.startswith("Bearer ") else None
        ok = not self.always_401 and token in self.issued and token not in self.revoked
        if self.mode == "static":
            ok = auth == f"Bearer {SENTINEL}"
        if self.mode == "open":
            ok = auth is None
        if not ok:
            challenge = 'Bearer error="invalid_token"'
            return Response(status=401, headers={"WWW-Authenticate": challenge})
        return Response(PATIENT, mimetype="application/fhir+json")


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj)


def _serve(app: Any, **kwargs: Any) -> tuple[BaseWSGIServer, threading.Thread]:
    server = make_server("127.0.0.1", 0, app, threaded=True, **kwargs)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    return server, thread


def _stop(server: BaseWSGIServer, thread: threading.Thread) -> None:
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ehr(clock: FakeClock) -> Iterator[FakeEhr]:
    fake = FakeEhr(clock)
    server, thread = _serve(fake)
    fake.base = f"http://127.0.0.1:{server.server_port}"
    try:
        yield fake
    finally:
        _stop(server, thread)


@pytest.fixture
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        s.trust_env = False  # no proxy from the environment for loopback
        yield s


def smart_config(ehr: FakeEhr, pem: str, alg: str = "RS384", **extra: Any) -> SmartBackendConfig:
    cfg = SmartBackendConfig.model_validate(
        {
            "type": "smart_backend",
            "token_url": ehr.token_url,
            "client_id": CLIENT_ID,
            "private_key": pem,
            "alg": alg,
            "kid": f"fhirbridge-{alg.lower()}",
            "scope": SCOPE,
            **extra,
        }
    )
    ehr.jwks = jwks([cfg])
    return cfg


def basic_config(ehr: FakeEhr, **extra: Any) -> ClientSecretBasicConfig:
    ehr.mode = "basic"
    return ClientSecretBasicConfig(
        token_url=ehr.token_url, client_id=CLIENT_ID, client_secret=SENTINEL, scope=SCOPE, **extra
    )


# --------------------------------------------------------------------------- SMART


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_smart_backend_assertion_is_verified_by_the_token_endpoint(
    ehr: FakeEhr, session: requests.Session, clock: FakeClock, alg: str, rsa_pem: str, ec_pem: str
) -> None:
    cfg = smart_config(ehr, rsa_pem if alg == "RS384" else ec_pem, alg)
    auth = build_auth(cfg, session=session, clock=clock)

    resp = session.get(ehr.fhir(), auth=auth, timeout=5)

    assert resp.status_code == 200, ehr.rejections
    assert ehr.rejections == []
    [form] = ehr.token_requests
    assert set(form) == {"grant_type", "scope", "client_assertion_type", "client_assertion"}
    [(header, claims)] = ehr.assertions
    assert header == {"alg": alg, "kid": cfg.kid, "typ": "JWT"}
    assert claims["iss"] == claims["sub"] == CLIENT_ID
    assert claims["aud"] == ehr.token_url
    assert claims["iat"] == int(clock.now)
    assert claims["exp"] - claims["iat"] == ASSERTION_LIFETIME <= 300
    assert str(uuid.UUID(claims["jti"])) == claims["jti"]
    assert ehr.fhir_requests == [(f"Bearer {ehr.issued[0]}", b"")]


def test_smart_backend_jku_header_and_key_file(
    ehr: FakeEhr, session: requests.Session, clock: FakeClock, tmp_path: Path, ec_pem: str
) -> None:
    key_file = tmp_path / "smart.pem"
    key_file.write_text(ec_pem)
    cfg = SmartBackendConfig(
        token_url=ehr.token_url,
        client_id=CLIENT_ID,
        private_key_file=key_file,
        alg="ES384",
        kid="k1",
        scope=SCOPE,
        jku="https://fhirbridge.example.org/.well-known/jwks.json",
    )
    ehr.jwks = jwks([cfg])

    assert session.get(ehr.fhir(), auth=build_auth(cfg, session=session), timeout=5).ok
    [(header, _)] = ehr.assertions
    assert header["jku"] == "https://fhirbridge.example.org/.well-known/jwks.json"


def test_pem_with_escaped_newlines_is_accepted(ehr: FakeEhr, rsa_pem: str) -> None:
    cfg = smart_config(ehr, rsa_pem.replace("\n", "\\n"))
    assert jwks([cfg]) == ehr.jwks


def test_token_is_cached_and_every_jti_is_unique(
    ehr: FakeEhr, session: requests.Session, clock: FakeClock, rsa_pem: str
) -> None:
    auth = build_auth(smart_config(ehr, rsa_pem), session=session, clock=clock)

    for _ in range(5):
        assert session.get(ehr.fhir(), auth=auth, timeout=5).ok
    assert len(ehr.token_requests) == 1
    assert isinstance(auth, OAuth2ClientCredentialsAuth) and auth.token_requests == 1

    for _ in range(3):
        auth.refresh()  # each refresh signs a new assertion: the server rejects jti replays
    assert len(ehr.token_requests) == 4
    assert len(ehr.jtis) == 4 and ehr.rejections == []


def test_token_is_renewed_before_expiry(
    ehr: FakeEhr, session: requests.Session, clock: FakeClock, rsa_pem: str
) -> None:
    auth = build_auth(smart_config(ehr, rsa_pem), session=session, clock=clock)
    assert session.get(ehr.fhir(), auth=auth, timeout=5).ok

    clock.advance(239)  # 61 s left of 300: still good
    assert session.get(ehr.fhir(), auth=auth, timeout=5).ok
    assert len(ehr.token_requests) == 1

    clock.advance(2)  # 59 s left: renewed before the request
    assert session.get(ehr.fhir(), auth=auth, timeout=5).ok
    assert len(ehr.token_requests) == 2
    assert [a for a, _ in ehr.fhir_requests] == [
        f"Bearer {ehr.issued[0]}",
        f"Bearer {ehr.issued[0]}",
        f"Bearer {ehr.issued[1]}",
    ]


def test_long_lived_token_is_renewed_with_ten_percent_left(
    ehr: FakeEhr, session: requests.Session, clock: FakeClock
) -> None:
    assert (refresh_margin(300), refresh_margin(3600), refresh_margin(30)) == (60, 360, 15)
    ehr.expires_in = "3600"  # some servers send a string
    auth = build_auth(basic_config(ehr), session=session, clock=clock)
    assert session.get(ehr.fhir(), auth=auth, timeout=5).ok
    clock.advance(3239)
    assert session.get(ehr.fhir(), auth=auth, timeout=5).ok
    assert len(ehr.token_requests) == 1
    clock.advance(2)
    assert session.get(ehr.fhir(), auth=auth, timeout=5).ok
    assert len(ehr.token_requests) == 2


def test_threads_share_one_token_request(
    ehr: FakeEhr, clock: FakeClock, session: requests.Session, rsa_pem: str
) -> None:
    ehr.token_delay = 0.2
    auth = build_auth(smart_config(ehr, rsa_pem), session=session, clock=clock)
    statuses: list[int] = []

    def work() -> None:
        with requests.Session() as mine:
            mine.trust_env = False
            for _ in range(3):
                statuses.append(mine.get(ehr.fhir(), auth=auth, timeout=5).status_code)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert statuses == [200] * 24
    assert len(ehr.token_requests) == 1


# --------------------------------------------------------------------------- 401


def test_401_renews_the_token_and_retries_once(
    ehr: FakeEhr, session: requests.Session, clock: FakeClock, rsa_pem: str
) -> None:
    auth = build_auth(smart_config(ehr, rsa_pem), session=session, clock=clock)
    assert session.get(ehr.fhir(), auth=auth, timeout=5).ok
    ehr.revoked.add(ehr.issued[0])  # the server forgets the token before it expires

    resp = session.put(ehr.fhir(), data=PATIENT, auth=auth, timeout=5)

    assert resp.status_code == 200
    assert [r.status_code for r in resp.history] == [401]
    assert len(ehr.token_requests) == 2
    assert ehr.fhir_requests[1:] == [
        (f"Bearer {ehr.issued[0]}", PATIENT),
        (f"Bearer {ehr.issued[1]}", PATIENT),  # same body, new token
    ]
    assert resp.request.headers["Authorization"] == f"Bearer {ehr.issued[1]}"


def test_a_second_401_is_returned_without_another_retry(
    ehr: FakeEhr, session: requests.Session, clock: FakeClock
) -> None:
    ehr.always_401 = True
    auth = build_auth(basic_config(ehr), session=session, clock=clock)

    resp = session.put(ehr.fhir(), data=PATIENT, auth=auth, timeout=5)

    assert resp.status_code == 401
    assert len(ehr.token_requests) == 2  # first token + one renewal
    assert len(ehr.fhir_requests) == 2  # first try + one retry


def test_streamed_body_is_not_replayed_after_401(
    ehr: FakeEhr, session: requests.Session, clock: FakeClock
) -> None:
    ehr.always_401 = True
    auth = build_auth(basic_config(ehr), session=session, clock=clock)

    resp = session.put(ehr.fhir(), data=io.BytesIO(PATIENT), auth=auth, timeout=5)

    assert resp.status_code == 401
    assert (len(ehr.token_requests), len(ehr.fhir_requests)) == (1, 1)


def test_token_is_not_sent_to_another_origin_after_a_redirect(
    ehr: FakeEhr, session: requests.Session, clock: FakeClock
) -> None:
    auth = build_auth(basic_config(ehr), session=session, clock=clock)

    resp = session.get(ehr.fhir("redirect-elsewhere"), auth=auth, timeout=5)

    assert resp.status_code == 401  # localhost is another origin than 127.0.0.1
    assert ehr.fhir_requests[-1][0] is None  # requests strips the header; no retry adds it
    assert len(ehr.token_requests) == 1


def test_401_then_failing_token_endpoint_raises_auth_error(
    ehr: FakeEhr, session: requests.Session, clock: FakeClock
) -> None:
    auth = build_auth(basic_config(ehr), session=session, clock=clock)
    assert session.get(ehr.fhir(), auth=auth, timeout=5).ok
    ehr.revoked.add(ehr.issued[0])
    ehr.fail = (401, {"error": "invalid_client"})

    with pytest.raises(AuthError) as err:
        session.get(ehr.fhir(), auth=auth, timeout=5)
    assert (err.value.status, err.value.error) == (401, "invalid_client")
    assert not err.value.retryable


# --------------------------------------------------------------------------- other methods


def test_client_secret_basic(ehr: FakeEhr, session: requests.Session, clock: FakeClock) -> None:
    ehr.mode = "basic"
    ehr.basic_secret = SENTINEL + ":+/ %"  # RFC 6749 §2.3.1: form-urlencoded before Basic
    cfg = ClientSecretBasicConfig(
        token_url=ehr.token_url, client_id=CLIENT_ID, client_secret=ehr.basic_secret, scope=SCOPE
    )
    auth = build_auth(cfg, session=session, clock=clock)

    assert session.get(ehr.fhir(), auth=auth, timeout=5).ok
    assert ehr.rejections == []
    assert ehr.token_requests == [{"grant_type": "client_credentials", "scope": SCOPE}]


def test_client_secret_basic_without_scope(
    ehr: FakeEhr, session: requests.Session, clock: FakeClock
) -> None:
    ehr.expected_scope = None
    cfg = basic_config(ehr).model_copy(update={"scope": None})
    assert session.get(ehr.fhir(), auth=build_auth(cfg, session=session), timeout=5).ok
    assert ehr.token_requests == [{"grant_type": "client_credentials"}]


def test_static_bearer_and_none(ehr: FakeEhr, session: requests.Session) -> None:
    ehr.mode = "static"
    bearer = build_auth(BearerAuthConfig(token=SENTINEL), session=session)
    assert session.put(ehr.fhir(), data=PATIENT, auth=bearer, timeout=5).ok
    assert ehr.fhir_requests == [(f"Bearer {SENTINEL}", PATIENT)]

    ehr.mode = "open"
    assert session.get(ehr.fhir(), auth=build_auth(NoAuthConfig(), session=session), timeout=5).ok
    assert ehr.fhir_requests[-1] == (None, b"")

    ehr.mode = "smart"  # a static token cannot be renewed: its 401 comes back unchanged
    resp = session.get(ehr.fhir(), auth=bearer, timeout=5)
    assert resp.status_code == 401 and len(ehr.fhir_requests) == 3 and ehr.token_requests == []


# --------------------------------------------------------------------------- token errors


def test_invalid_client_raises_auth_error_without_secrets(
    ehr: FakeEhr, session: requests.Session, clock: FakeClock
) -> None:
    auth = build_auth(basic_config(ehr), session=session, clock=clock)
    # a careless server echoing the credential in its description
    ehr.fail = (400, {"error": "invalid_client", "error_description": f"bad secret {SENTINEL}"})

    with pytest.raises(AuthError) as err:
        session.get(ehr.fhir(), auth=auth, timeout=5)

    message = str(err.value)
    assert ehr.token_url in message and "400" in message and "invalid_client" in message
    assert SENTINEL not in message and "[redacted]" in message
    assert (err.value.status, err.value.error) == (400, "invalid_client")
    assert not err.value.retryable
    assert err.value.__cause__ is None and err.value.__context__ is None


def test_smart_invalid_client_message_has_no_assertion(
    ehr: FakeEhr, session: requests.Session, clock: FakeClock, ec_pem: str
) -> None:
    auth = build_auth(smart_config(ehr, ec_pem, "ES384"), session=session, clock=clock)
    ehr.fail = (400, {"error": "invalid_client"})

    with pytest.raises(AuthError, match="invalid_client") as err:
        session.get(ehr.fhir(), auth=auth, timeout=5)

    [form] = ehr.token_requests
    assertion = form["client_assertion"]
    assert assertion not in str(err.value) and assertion.split(".")[2] not in str(err.value)
    assert _pem_body(ec_pem) not in str(err.value)


@pytest.mark.parametrize(
    ("fail", "status", "error", "retryable"),
    [
        ((503, "<html>down</html>"), 503, None, True),
        ((429, {"error": "slow_down"}), 429, "slow_down", True),
        ((400, {"error": 'bad"code\n'}), 400, None, False),  # not an RFC 6749 error code
        ((200, {"token_type": "bearer"}), 200, BAD, False),
        ((200, {"access_token": "x", "token_type": "mac"}), 200, BAD, False),
        ((200, "not json"), 200, BAD, False),
        ((200, {"access_token": "x", "token_type": "Bearer", "expires_in": 0}), 200, BAD, False),
        ((302, {}), 302, None, False),  # redirects are not followed
    ],
)
def test_token_endpoint_errors(
    ehr: FakeEhr,
    session: requests.Session,
    fail: tuple[int, Any],
    status: int,
    error: str | None,
    retryable: bool,
) -> None:
    ehr.fail = fail
    auth = build_auth(basic_config(ehr), session=session)
    with pytest.raises(AuthError) as err:
        session.get(ehr.fhir(), auth=auth, timeout=5)
    assert (err.value.status, err.value.error, err.value.retryable) == (status, error, retryable)


def test_unreachable_token_endpoint(session: requests.Session) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = ClientSecretBasicConfig(
        token_url=f"http://127.0.0.1:{port}/token", client_id=CLIENT_ID, client_secret=SENTINEL
    )
    with pytest.raises(AuthError, match="no response") as err:
        session.get("http://127.0.0.1:9/", auth=build_auth(cfg, session=session), timeout=5)
    assert err.value.status is None and err.value.retryable
    assert f"127.0.0.1:{port}/token" in str(err.value) and SENTINEL not in str(err.value)


# --------------------------------------------------------------------------- TLS


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fhirbridge test CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "ca.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_text(_pem(key))
    return cert_file, key_file


def test_tls_token_endpoint_needs_the_configured_ca_bundle(
    tmp_path: Path, session: requests.Session, clock: FakeClock
) -> None:
    cert_file, key_file = _self_signed(tmp_path)
    fake = FakeEhr(clock)
    server, thread = _serve(fake, ssl_context=(str(cert_file), str(key_file)))
    fake.base = f"https://127.0.0.1:{server.server_port}"
    try:
        cfg = basic_config(fake)
        trusted = build_auth(cfg, session=session, verify=tls_verify(cert_file))
        assert isinstance(trusted, OAuth2ClientCredentialsAuth)
        trusted.refresh()
        assert len(fake.issued) == 1

        untrusted = build_auth(cfg, session=session, verify=tls_verify(None))
        with pytest.raises(AuthError, match="SSLError") as err:
            untrusted.refresh()
        assert err.value.status is None and SENTINEL not in str(err.value)
    finally:
        _stop(server, thread)


def test_tls_verification_cannot_be_disabled(tmp_path: Path, session: requests.Session) -> None:
    assert tls_verify(None) is True
    bundle = tmp_path / "ca.pem"
    bundle.write_text("")
    assert tls_verify(bundle) == str(bundle)
    with pytest.raises(AuthConfigError, match="does not exist"):
        tls_verify(tmp_path / "missing.pem")
    with pytest.raises(AuthConfigError, match="cannot be disabled"):
        build_auth(NoAuthConfig(), session=session, verify=False)
    session.verify = False
    with pytest.raises(AuthConfigError, match="disabled"):
        build_auth(NoAuthConfig(), session=session)


# --------------------------------------------------------------------------- configuration


def test_configs_parse_as_a_discriminated_union(rsa_pem: str) -> None:
    adapter: TypeAdapter[AuthConfig] = TypeAdapter(AuthConfig)
    assert isinstance(adapter.validate_python({"type": "none"}), NoAuthConfig)
    assert isinstance(parse_auth_config({"type": "bearer", "token": "t"}), BearerAuthConfig)
    basic = parse_auth_config(
        {
            "type": "client_secret_basic",
            "token_url": "https://ehr.example.org/oauth2/token",
            "client_id": "c",
            "client_secret": "s",
        }
    )
    assert isinstance(basic, ClientSecretBasicConfig) and basic.scope is None
    smart = parse_auth_config(
        {
            "type": "smart_backend",
            "token_url": "https://fhir.epic.example.org/oauth2/token",
            "client_id": "c",
            "private_key": rsa_pem,
            "alg": "RS384",
            "kid": "k",
            "scope": SCOPE,
        }
    )
    assert isinstance(smart, SmartBackendConfig)
    assert smart.token_url == "https://fhir.epic.example.org/oauth2/token"  # verbatim (aud)
    with pytest.raises(ValidationError):
        smart.kid = "other"  # type: ignore[misc]  # frozen


@pytest.mark.parametrize(
    ("alg", "key", "message"),
    [
        ("RS384", "ec384", "needs an RSA private key"),
        ("ES384", "rsa2048", "needs an EC P-384 private key"),
        ("ES384", "ec256", "needs curve P-384"),
        ("RS384", "rsa1024", "need >= 2048"),
        ("RS384", "garbage", "not an unencrypted PEM private key"),
    ],
)
def test_key_must_match_alg(alg: str, key: str, message: str, rsa_pem: str, ec_pem: str) -> None:
    pems = {
        "ec384": ec_pem,
        "rsa2048": rsa_pem,
        "ec256": _pem(ec.generate_private_key(ec.SECP256R1())),
        "rsa1024": _pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)),
        "garbage": f"-----BEGIN PRIVATE KEY-----\n{SENTINEL}\n-----END PRIVATE KEY-----\n",
    }
    data = {
        "type": "smart_backend",
        "token_url": "https://ehr.example.org/token",
        "client_id": "c",
        "private_key": pems[key],
        "alg": alg,
        "kid": "k",
        "scope": SCOPE,
    }
    with pytest.raises(ValidationError, match=message) as err:
        SmartBackendConfig.model_validate(data)
    assert _pem_body(pems[key]) not in str(err.value) and SENTINEL not in str(err.value)
    with pytest.raises(AuthConfigError, match=message) as err2:
        parse_auth_config(data)
    assert _pem_body(pems[key]) not in str(err2.value) and SENTINEL not in str(err2.value)


def test_exactly_one_key_source(tmp_path: Path, rsa_pem: str) -> None:
    base = {"token_url": "https://e.org/t", "client_id": "c", "alg": "RS384", "kid": "k"}
    with pytest.raises(ValidationError, match="exactly one"):
        SmartBackendConfig.model_validate({**base, "scope": SCOPE})
    key_file = tmp_path / "k.pem"
    key_file.write_text(rsa_pem)
    with pytest.raises(ValidationError, match="exactly one"):
        SmartBackendConfig.model_validate(
            {**base, "scope": SCOPE, "private_key": rsa_pem, "private_key_file": key_file}
        )
    with pytest.raises(ValidationError, match="cannot read"):
        SmartBackendConfig.model_validate(
            {**base, "scope": SCOPE, "private_key_file": tmp_path / "missing.pem"}
        )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("token_url", "http://ehr.example.org/token", "must use https"),
        ("token_url", "https://user:pw@ehr.example.org/token", "credentials"),
        ("token_url", "/token", "absolute https URL"),
        ("jku", "http://fhirbridge.example.org/jwks.json", "https URL"),
        ("alg", "RS256", "RS384"),
        ("kid", "", "at least 1"),
    ],
)
def test_invalid_smart_fields(field: str, value: str, message: str, rsa_pem: str) -> None:
    data = {
        "token_url": "https://e.org/t",
        "client_id": "c",
        "private_key": rsa_pem,
        "alg": "RS384",
        "kid": "k",
        "scope": SCOPE,
        field: value,
    }
    with pytest.raises(ValidationError, match=message):
        SmartBackendConfig.model_validate(data)


def test_no_secret_in_repr_dump_or_validation_errors(rsa_pem: str) -> None:
    basic = ClientSecretBasicConfig(
        token_url="https://e.org/t", client_id="c", client_secret=SENTINEL
    )
    bearer = BearerAuthConfig(token=SENTINEL)
    smart = SmartBackendConfig(
        token_url="https://e.org/t",
        client_id="c",
        private_key=rsa_pem,
        alg="RS384",
        kid="k",
        scope=SCOPE,
    )
    for cfg in (basic, bearer, smart):
        shown = [repr(cfg), str(cfg), repr(cfg.model_dump()), cfg.model_dump_json()]
        shown.append(repr(cfg.model_dump(mode="json")))
        for text in shown:
            assert SENTINEL not in text and _pem_body(rsa_pem) not in text
    with requests.Session() as s:
        for cfg in (basic, bearer, smart):
            assert SENTINEL not in repr(build_auth(cfg, session=s))

    bad_inputs: list[dict[str, Any]] = [
        {"type": "bearer", "token": SENTINEL, "extra": SENTINEL},  # extra="forbid"
        {"type": "bearer", "tokn": SENTINEL},  # misspelt field: the value is a secret
        {"type": "client_secret_basic", "client_id": "c", "client_secret": SENTINEL},
        {"type": "client_secret_basic", "token_url": f"http://x.org/{SENTINEL}"},
        {"type": "smart_backend", "private_key": rsa_pem, "alg": "ES384", "kid": "k"},
        {"type": "nonsense", "token": SENTINEL},
    ]

    # pydantic applies hide_input_in_errors of the *outermost* model: a model embedding
    # AuthConfig (the target configuration) must set it too, as this one does.
    class Target(BaseModel):
        model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)
        base_url: str
        auth: AuthConfig

    for data in bad_inputs:
        with pytest.raises(AuthConfigError) as parsed:
            parse_auth_config(data)
        with pytest.raises(ValidationError) as embedded:
            Target.model_validate({"base_url": "https://e.org/fhir", "auth": data})
        for text in (str(parsed.value), str(embedded.value)):
            assert SENTINEL not in text and _pem_body(rsa_pem) not in text
        assert "auth" in str(embedded.value)  # the location is still named
    with pytest.raises(ValidationError) as model_err:
        BearerAuthConfig.model_validate({"token": SENTINEL, "oops": SENTINEL})
    assert SENTINEL not in str(model_err.value)


def test_no_secret_in_logs(
    ehr: FakeEhr,
    session: requests.Session,
    clock: FakeClock,
    rsa_pem: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    basic = build_auth(basic_config(ehr), session=session, clock=clock)
    assert session.get(ehr.fhir("Patient?identifier=urn:mrn|12345"), auth=basic, timeout=5).ok
    ehr.revoked.add(ehr.issued[-1])
    assert session.put(ehr.fhir(), data=PATIENT, auth=basic, timeout=5).ok  # 401 + retry
    ehr.fail = (400, {"error": "invalid_client", "error_description": SENTINEL})
    with pytest.raises(AuthError):
        basic.refresh()

    ehr.mode, ehr.fail = "smart", None
    smart = build_auth(smart_config(ehr, rsa_pem), session=session, clock=clock)
    assert session.get(ehr.fhir(), auth=smart, timeout=5).ok
    ehr.fail = (400, {"error": "invalid_client"})
    with pytest.raises(AuthError):
        smart.refresh()

    text = caplog.text + "".join(str(r.args) for r in caplog.records)  # every logger
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("fhirbridge"))
    assert "401 from http://127.0.0.1" in ours
    for secret in [SENTINEL, _pem_body(rsa_pem), *ehr.issued, *ehr.raw_assertions]:
        assert secret not in text
    assert "12345" not in ours  # FHIR paths and queries (patient identifiers) are not logged


# --------------------------------------------------------------------------- JWKS


def test_jwks_holds_public_keys_only(ehr: FakeEhr, rsa_pem: str, ec_pem: str) -> None:
    rs, es = smart_config(ehr, rsa_pem, "RS384"), smart_config(ehr, ec_pem, "ES384")
    same_key_other_target = rs.model_copy(update={"token_url": "https://other.org/token"})

    keys = jwks([rs, es, same_key_other_target])["keys"]

    assert [k["kid"] for k in keys] == [rs.kid, es.kid]
    rsa_jwk, ec_jwk = keys
    assert set(rsa_jwk) == {"kty", "n", "e", "kid", "alg", "use", "key_ops"}
    assert set(ec_jwk) == {"kty", "crv", "x", "y", "kid", "alg", "use", "key_ops"}
    assert (rsa_jwk["kty"], rsa_jwk["alg"], rsa_jwk["use"], rsa_jwk["key_ops"]) == (
        "RSA",
        "RS384",
        "sig",
        ["verify"],
    )
    assert (ec_jwk["kty"], ec_jwk["crv"], ec_jwk["alg"]) == ("EC", "P-384", "ES384")
    with pytest.raises(AuthConfigError, match="two different keys"):
        jwks([rs, es.model_copy(update={"kid": rs.kid})])


def test_jwks_blueprint(rsa_pem: str, ec_pem: str) -> None:
    configs = [
        SmartBackendConfig(
            token_url="https://e.org/t",
            client_id="c",
            private_key=pem,
            alg=alg,
            kid=alg,
            scope=SCOPE,
        )
        for pem, alg in ((rsa_pem, "RS384"), (ec_pem, "ES384"))
    ]
    app = Flask(__name__)
    app.register_blueprint(make_blueprint(DEFAULT_PATH, lambda: jwks(configs)))
    app.register_blueprint(
        make_blueprint("/leaky.json", lambda: {"keys": [{"kty": "EC", "d": "x"}]}),
        name="leaky",
    )
    client = app.test_client()

    resp = client.get("/.well-known/jwks.json")
    assert resp.status_code == 200 and resp.mimetype == "application/json"
    assert resp.headers["Cache-Control"] == "max-age=300"
    assert resp.get_json() == jwks(configs)
    assert client.post(DEFAULT_PATH).status_code == 405
    leaky = client.get("/leaky.json")
    assert leaky.status_code == 500 and b'"d"' not in leaky.data
    with pytest.raises(ValueError, match="must start with"):
        make_blueprint("jwks.json", lambda: {"keys": []})
