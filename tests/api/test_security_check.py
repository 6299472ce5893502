"""Scripted security check: every attack on the write path is refused with its exact 4xx, an
OperationOutcome, and leaves the store as it was.

The app runs as in a hospital: two API keys (a writer with submissions.write only, a reader with
fhir.read only) and bearer JWTs verified with an RS256 PEM key. Each attack posts the real
fixture submission (so a missed check would store 27 resources), then the store's rows and a
FHIR search with a good key show nothing arrived. The last check posts the same document with
the writer's key and sees it stored: the counting can see a write.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from fhirbridge import create_app
from fhirbridge.auth.apikeys import entry, new_key
from fhirbridge.settings import Settings
from fhirbridge.store import schema

ROOT = Path(__file__).resolve().parents[2]
DOC: dict[str, Any] = json.loads((ROOT / "mappings/fixtures/medicine-session.in.json").read_text())
BODY = json.dumps(DOC).encode()
AUD = "https://fhirbridge.example/fhir"
ISS = "https://idp.example"
MAX_BODY = 16 * 1024
MAX_DEPTH = 16
MAX_ARRAY = 50
SIGNING_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PUBLIC_PEM = SIGNING_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)
WRITE_KEY, READ_KEY = new_key(), new_key()
CLINICAL_TYPES = ("Patient", "Observation", "Procedure", "Provenance", "MedicationAdministration")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {"iss": ISS, "aud": AUD, "exp": now + 300, "iat": now}
    claims.update({"client_id": "idp-writer", "scope": "submissions.write", **over})
    return claims


def _forged(alg: str, claims: dict[str, Any], sign: Callable[[bytes], bytes]) -> str:
    head = _b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    signing_input = f"{head}.{_b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{_b64(sign(signing_input.encode()))}"


def _jwt(**over: Any) -> str:
    return jwt.encode(_claims(**over), SIGNING_KEY, algorithm="RS256")


def _nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"n": value}
    return value


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass(frozen=True)
class Attack:
    name: str
    status: int
    issue: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = BODY
    content_type: str = "application/json"
    challenge: str | None = None


INVALID_TOKEN = 'Bearer realm="fhirbridge", error="invalid_token"'

ATTACKS = [
    Attack("no token", 401, "login", challenge='Bearer realm="fhirbridge"'),
    Attack(
        "expired token",
        401,
        "login",
        _bearer(_jwt(exp=int(time.time()) - 3600, iat=int(time.time()) - 3900)),
        challenge=INVALID_TOKEN,
    ),
    Attack(
        "wrong audience",
        401,
        "login",
        _bearer(_jwt(aud="https://other-service.example")),
        challenge=INVALID_TOKEN,
    ),
    Attack(
        "alg none",
        401,
        "login",
        _bearer(_forged("none", _claims(), lambda _: b"")),
        challenge=INVALID_TOKEN,
    ),
    Attack(
        "HS256 keyed with the public key",
        401,
        "login",
        _bearer(
            _forged("HS256", _claims(), lambda d: hmac.new(PUBLIC_PEM, d, hashlib.sha256).digest())
        ),
        challenge=INVALID_TOKEN,
    ),
    Attack("unknown API key", 401, "login", {"X-API-Key": new_key()}, challenge=INVALID_TOKEN),
    Attack(
        "API key without submissions.write",
        403,
        "forbidden",
        _bearer(READ_KEY),
        challenge='Bearer realm="fhirbridge", error="insufficient_scope", '
        'scope="submissions.write"',
    ),
    Attack(
        "JWT without submissions.write",
        403,
        "forbidden",
        _bearer(_jwt(scope="fhir.read")),
        challenge='Bearer realm="fhirbridge", error="insufficient_scope", '
        'scope="submissions.write"',
    ),
    Attack(
        "oversized body",
        413,
        "too-long",
        _bearer(WRITE_KEY),
        body=json.dumps({**DOC, "padding": "x" * MAX_BODY}).encode(),
    ),
    Attack(
        "wrong content type", 415, "not-supported", _bearer(WRITE_KEY), content_type="text/plain"
    ),
    Attack("malformed JSON", 400, "structure", _bearer(WRITE_KEY), body=BODY[:-7]),
]
DEPTH_ATTACKS = [
    Attack(
        "deep nesting",
        400,
        "too-costly",
        _bearer(WRITE_KEY),
        body=json.dumps({**DOC, "extra": _nested(MAX_DEPTH + 8)}).encode(),
    ),
    Attack(
        "too-long array",
        400,
        "too-costly",
        _bearer(WRITE_KEY),
        body=json.dumps({**DOC, "extra": list(range(MAX_ARRAY + 1))}).encode(),
    ),
]


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flask]:
    db = tmp_path_factory.mktemp("security") / "db.sqlite"
    app = create_app(
        Settings(
            database_url=f"sqlite:///{db}",
            mappings_dir=ROOT / "mappings",
            db_auto_upgrade=True,
            rate_limit="",  # every attack must meet its own check, not the rate limit
            max_body_bytes=MAX_BODY,
            max_json_depth=MAX_DEPTH,
            max_array_length=MAX_ARRAY,
            auth_api_keys=[
                entry(WRITE_KEY, "writer", ["submissions.write"]),
                entry(READ_KEY, "reader", ["fhir.read"]),
            ],
            auth_jwt_public_key=PUBLIC_PEM.decode(),
            auth_jwt_audience=AUD,
            auth_jwt_issuer=ISS,
        )
    )
    yield app
    app.extensions["fhirbridge"].store.close()


@pytest.fixture
def client(app: Flask) -> Iterator[FlaskClient]:
    with app.test_client() as test_client:
        yield test_client


def _stored(app: Flask, client: FlaskClient) -> dict[str, int]:
    """Clinical rows in the store, and what a FHIR search with a good key finds (AuditEvents
    are left out: recording a refused attempt is the point of them)."""
    engine = app.extensions["fhirbridge"].store.engine
    with engine.connect() as conn:
        counts = {
            "submission": conn.scalar(select(func.count()).select_from(schema.submissions)),
            "delivery": conn.scalar(select(func.count()).select_from(schema.delivery)),
        }
        for table in (schema.resources, schema.resource_history):
            counts[table.name] = conn.scalar(
                select(func.count()).select_from(table).where(table.c.resource_type != "AuditEvent")
            )
    for rtype in CLINICAL_TYPES:
        found = client.get(f"/fhir/{rtype}", headers=_bearer(READ_KEY))
        assert found.status_code == 200, found.json
        counts[f"search {rtype}"] = found.json["total"]
    return {k: int(v or 0) for k, v in counts.items()}


def _attack(app: Flask, client: FlaskClient, attack: Attack) -> None:
    before = _stored(app, client)
    resp = client.post(
        "/api/v1/submissions",
        data=attack.body,
        content_type=attack.content_type,
        headers=attack.headers,
    )
    assert resp.status_code == attack.status, (attack.name, resp.get_data(as_text=True)[:500])
    body = resp.json
    assert body is not None and body["resourceType"] == "OperationOutcome", attack.name
    assert [i["code"] for i in body["issue"]] == [attack.issue], (attack.name, body)
    if attack.challenge is not None:
        assert resp.headers.get("WWW-Authenticate") == attack.challenge, attack.name
    text = resp.get_data(as_text=True)
    for value in attack.headers.values():
        assert value.split()[-1] not in text, f"{attack.name}: the answer echoes the credential"
    assert _stored(app, client) == before, f"{attack.name}: something was stored"


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: a.name)
def test_attack_is_refused_and_stores_nothing(
    app: Flask, client: FlaskClient, attack: Attack
) -> None:
    _attack(app, client, attack)


@pytest.mark.parametrize("attack", DEPTH_ATTACKS, ids=lambda a: a.name)
def test_costly_body_is_refused_and_stores_nothing(
    app: Flask, client: FlaskClient, attack: Attack
) -> None:
    _attack(app, client, attack)


def test_reads_are_guarded_too(client: FlaskClient) -> None:
    """The writer cannot read FHIR, the reader cannot read AuditEvents or sync admin."""
    cases = [
        ("/fhir/Patient", {}, 401, "login"),
        ("/fhir/Patient", _bearer(WRITE_KEY), 403, "forbidden"),
        ("/fhir/AuditEvent", _bearer(READ_KEY), 403, "forbidden"),
        ("/api/v1/sync/status", _bearer(READ_KEY), 403, "forbidden"),
        ("/fhir/Patient", _bearer(_jwt(scope="fhir.read", aud="elsewhere")), 401, "login"),
    ]
    for path, headers, status, issue in cases:
        resp = client.get(path, headers=headers)
        assert resp.status_code == status, (path, headers)
        assert resp.json["resourceType"] == "OperationOutcome"
        assert [i["code"] for i in resp.json["issue"]] == [issue]


def test_control_the_same_document_with_the_writer_key_is_stored(
    app: Flask, client: FlaskClient
) -> None:
    """Runs last: proves the counts above would have seen a write."""
    before = _stored(app, client)
    for headers in (_bearer(WRITE_KEY), _bearer(_jwt())):
        resp = client.post(
            "/api/v1/submissions", data=BODY, content_type="application/json", headers=headers
        )
        assert resp.status_code in (200, 201), resp.json
    after = _stored(app, client)
    assert after["submission"] == before["submission"] + 1
    assert after["search Patient"] == before["search Patient"] + 1
    assert after["fhir_resource"] == before["fhir_resource"] + 27
