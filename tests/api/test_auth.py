"""The authentication hook through create_app: 401/403 as OperationOutcomes, scopes per route."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from flask import Flask, Request, Response, jsonify
from flask.testing import FlaskClient

from fhirbridge import create_app
from fhirbridge.api.access import (
    FHIR_READ,
    UNAUTHENTICATED,
    Principal,
    access_of,
    current_principal,
    public,
    requires,
)
from fhirbridge.auth import ANONYMOUS, add_credential_source, authenticator
from fhirbridge.auth.apikeys import entry, new_key
from fhirbridge.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
AUD = "fhirbridge-test"
ISS = "https://idp.example"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PEM = (
    RSA_KEY.public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode()
)
READ_KEY, WRITE_KEY, ADMIN_KEY = new_key(), new_key(), new_key()


def _settings(tmp_path: Path, **over: Any) -> Settings:
    return Settings(
        database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
        mappings_dir=ROOT / "mappings",
        db_auto_upgrade=True,
        **over,
    )


def _whoami() -> Callable[[], Response]:
    """A fresh view function (the access decorators mark the function object itself)."""

    def view() -> Response:
        p = current_principal()
        return jsonify({"client_id": p.client_id, "scopes": sorted(p.scopes), "method": p.method})

    return view


def _add_probe_routes(app: Flask) -> None:
    """Routes only this test adds: one per kind of Access, and one that declares none."""
    app.add_url_rule("/t/read", "t_read", requires(FHIR_READ)(_whoami()))
    app.add_url_rule("/t/public", "t_public", public(_whoami()))
    app.add_url_rule("/t/undeclared", "t_undeclared", _whoami())


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    app = create_app(
        _settings(
            tmp_path,
            auth_api_keys=[
                entry(READ_KEY, "reader", ["fhir.read"]),
                entry(WRITE_KEY, "lab", ["submissions.write"]),
                entry(ADMIN_KEY, "ops", ["fhir.read", "sync.admin"]),
            ],
            auth_jwt_public_key=PEM,
            auth_jwt_audience=AUD,
            auth_jwt_issuer=ISS,
        )
    )
    _add_probe_routes(app)
    yield app
    app.extensions["fhirbridge"].store.close()


@pytest.fixture
def client(app: Flask) -> Iterator[FlaskClient]:
    with app.test_client() as test_client:
        yield test_client


def _token(**over: Any) -> str:
    now = int(time.time())
    claims = {"iss": ISS, "aud": AUD, "exp": now + 300, "client_id": "idp-app"}
    claims.update({"scope": "fhir.read", **over})
    return jwt.encode(claims, RSA_KEY, algorithm="RS256")


def _outcome(resp: Any, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.mimetype == "application/fhir+json"
    body: dict[str, Any] = resp.json
    assert body["resourceType"] == "OperationOutcome"
    assert [i["code"] for i in body["issue"]] == [code]
    return body


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_no_credentials_is_401_login_with_a_bearer_challenge(client: FlaskClient) -> None:
    resp = client.get("/fhir/Patient")
    _outcome(resp, 401, "login")
    assert resp.headers["WWW-Authenticate"] == 'Bearer realm="fhirbridge"'


def test_api_key_in_either_header(client: FlaskClient) -> None:
    for headers in (_bearer(READ_KEY), {"X-API-Key": READ_KEY}):
        resp = client.get("/t/read", headers=headers)
        assert resp.status_code == 200
        assert resp.json == {"client_id": "reader", "scopes": ["fhir.read"], "method": "api-key"}
    assert client.get("/fhir/Patient", headers={"X-API-Key": READ_KEY}).status_code == 200


def test_bad_credentials_are_401_invalid_token_and_only_a_category_is_logged(
    client: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    expired = _token(exp=int(time.time()) - 3600)
    wrong_key = new_key()
    cases = [
        (_bearer(wrong_key), "unknown-api-key"),
        ({"X-API-Key": wrong_key}, "unknown-api-key"),
        (_bearer(expired), "jwt-expired"),
        (_bearer(_token(aud="someone-else")), "jwt-audience"),
        (_bearer("garbage"), "jwt-malformed"),
        ({"Authorization": f"Basic {READ_KEY}"}, "not-bearer"),
        ({"Authorization": f"Bearer {READ_KEY}", "X-API-Key": READ_KEY}, "two-credentials"),
    ]
    for headers, category in cases:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="fhirbridge"):
            resp = client.get("/fhir/Patient", headers=headers)
        _outcome(resp, 401, "login")
        challenge = 'Bearer realm="fhirbridge", error="invalid_token"'
        assert resp.headers["WWW-Authenticate"] == challenge
        auth_lines = [r.getMessage() for r in caplog.records if r.name == "fhirbridge.auth.hook"]
        assert auth_lines == [f"authentication refused: {category}"]
        logged = caplog.text + resp.get_data(as_text=True)
        assert wrong_key not in logged and expired not in logged and READ_KEY not in logged


def test_missing_scope_is_403_insufficient_scope(client: FlaskClient) -> None:
    resp = client.get("/fhir/Patient", headers=_bearer(WRITE_KEY))
    body = _outcome(resp, 403, "forbidden")
    assert "fhir.read" in body["issue"][0]["diagnostics"]
    assert resp.headers["WWW-Authenticate"] == (
        'Bearer realm="fhirbridge", error="insufficient_scope", scope="fhir.read"'
    )
    resp = client.post("/api/v1/submissions", json={}, headers=_bearer(READ_KEY))
    _outcome(resp, 403, "forbidden")


def test_audit_events_need_sync_admin(client: FlaskClient) -> None:
    resp = client.get("/fhir/AuditEvent", headers=_bearer(READ_KEY))
    _outcome(resp, 403, "forbidden")
    assert 'scope="sync.admin"' in resp.headers["WWW-Authenticate"]
    assert client.get("/fhir/AuditEvent/x", headers=_bearer(READ_KEY)).status_code == 403
    assert client.get("/fhir/AuditEvent", headers=_bearer(ADMIN_KEY)).status_code == 200
    assert client.get("/fhir/Patient", headers=_bearer(READ_KEY)).status_code == 200


def test_valid_jwt_is_accepted_with_its_scopes(client: FlaskClient) -> None:
    resp = client.get("/t/read", headers=_bearer(_token()))
    assert resp.json == {"client_id": "idp-app", "scopes": ["fhir.read"], "method": "jwt"}
    no_read = _token(scope="submissions.write")
    _outcome(client.get("/fhir/Patient", headers=_bearer(no_read)), 403, "forbidden")


def test_routing_errors_stay_404_and_405_without_credentials(client: FlaskClient) -> None:
    _outcome(client.get("/no/such/path"), 404, "not-found")
    _outcome(client.get("/api/v1/submissions"), 405, "not-supported")


def test_public_routes_need_no_credentials(client: FlaskClient) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    assert client.get("/fhir/metadata").status_code == 200
    assert client.get("/.well-known/jwks.json").status_code == 200
    # the caller of a public route: anonymous, or who valid credentials say; bad ones ignored
    assert client.get("/t/public").json["client_id"] == ANONYMOUS.client_id
    assert client.get("/t/public").json["scopes"] == []
    assert client.get("/t/public", headers=_bearer(READ_KEY)).json["client_id"] == "reader"
    bad = client.get("/t/public", headers=_bearer(new_key()))
    assert bad.status_code == 200 and bad.json["client_id"] == ANONYMOUS.client_id


def test_a_route_without_access_rule_is_refused_and_logged(
    client: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="fhirbridge"):
        resp = client.get("/t/undeclared", headers=_bearer(ADMIN_KEY))
    _outcome(resp, 403, "forbidden")
    assert "t_undeclared" in caplog.text


def test_credential_sources_are_asked_only_without_headers(app: Flask) -> None:
    seen: list[str] = []

    def cookie_source(req: Request) -> Principal | None:
        seen.append(req.path)
        if req.cookies.get("session") == "good":
            return Principal("console:alice", frozenset({FHIR_READ}), "console")
        return None

    add_credential_source(app, cookie_source)
    with app.test_client() as client:
        _outcome(client.get("/t/read"), 401, "login")
        client.set_cookie("session", "good")
        assert client.get("/t/read").json["client_id"] == "console:alice"
        # an explicit (bad) credential wins over the cookie: no fallback to the session
        _outcome(client.get("/t/read", headers=_bearer(new_key())), 401, "login")
    assert seen == ["/t/read", "/t/read"]


def test_authenticator_checks_a_pasted_key(app: Flask) -> None:
    auth = authenticator(app)
    assert auth.enabled
    principal = auth.api_key(ADMIN_KEY)
    assert principal is not None and principal.client_id == "ops"
    assert auth.api_key(new_key()) is None
    with pytest.raises(RuntimeError, match="init_app"):
        authenticator(Flask("bare"))


def test_without_auth_configured_every_request_is_unauthenticated(tmp_path: Path) -> None:
    app = create_app(_settings(tmp_path))
    _add_probe_routes(app)
    try:
        assert not authenticator(app).enabled
        with app.test_client() as client:
            for path in ("/t/read", "/t/public"):
                body = client.get(path).json
                assert body["client_id"] == UNAUTHENTICATED.client_id
                assert body["scopes"] == sorted(UNAUTHENTICATED.scopes)
            # a header sent anyway changes nothing
            assert client.get("/t/read", headers=_bearer("junk")).status_code == 200
            # and a route that declares nothing stays closed
            _outcome(client.get("/t/undeclared"), 403, "forbidden")
    finally:
        app.extensions["fhirbridge"].store.close()


def test_every_route_declares_its_access(tmp_path: Path) -> None:
    app = create_app(_settings(tmp_path))
    try:
        undeclared = [
            rule.rule
            for rule in app.url_map.iter_rules()
            if rule.endpoint != "static" and access_of(app.view_functions[rule.endpoint]) is None
        ]
        assert len(list(app.url_map.iter_rules())) > 10
        assert undeclared == []
    finally:
        app.extensions["fhirbridge"].store.close()
