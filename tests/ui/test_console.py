"""The ops console through Flask's test client: sign-in, sessions, scopes, CSRF, replay, headers.

The target points at an unreachable loopback port and no worker runs: the test moves rows
through the outbox as a worker would (claim, then record the outcome), like tests/api's sync
tests. tests/ui/test_console_browser.py drives the same pages in Chromium against a real FHIR
server.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from fhirbridge.sync.outbox import Outbox
from fhirbridge.ui.session import COOKIE_NAME, LIFETIME
from tests.ui.support import (
    ADMIN_KEY,
    DOC,
    KEYS,
    READER_KEY,
    SUBMITTER_KEY,
    assert_no_phi,
    csrf_of,
    make_app,
)

TARGET = "research-store"
REPLAY_ALL = f"/ui/targets/{TARGET}/dead-letters/replay"


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    app = make_app(tmp_path)
    yield app
    app.extensions["fhirbridge"].store.close()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def _outbox(app: Flask) -> Outbox:
    outbox: Outbox = app.extensions["fhirbridge"].outbox
    return outbox


def _submit(client: FlaskClient) -> dict[str, Any]:
    resp = client.post(
        "/api/v1/submissions",
        data=json.dumps(DOC),
        content_type="application/json",
        headers={"X-API-Key": SUBMITTER_KEY},
    )
    assert resp.status_code == 201, resp.get_json()
    body: dict[str, Any] = resp.get_json()
    return body


def _dead_letters(app: Flask, body: dict[str, Any]) -> list[tuple[str, str]]:
    """Play a worker: two Observations dead-lettered, the Patient sent, the rest given back."""
    outbox = _outbox(app)
    now = datetime.now(UTC)
    claimed = outbox.claim(TARGET, owner="w", now=now)
    assert len(claimed) == 27
    obs = sorted((r["resourceType"], r["id"]) for r in body["resources"])
    obs = [k for k in obs if k[0] == "Observation"][:2]
    patient = next(
        (r["resourceType"], r["id"])
        for r in body["resources"]
        if r["id"] and r["resourceType"] == "Patient"
    )
    assert outbox.record(
        TARGET,
        patient,
        owner="w",
        version=1,
        status="sent",
        now=now,
        server_id="srv-1",
        server_version="1",
        action="put",
    )
    for i, key in enumerate(obs):
        assert outbox.record(
            TARGET,
            key,
            owner="w",
            version=1,
            status="dead",
            now=now + timedelta(seconds=i + 1),
            error=f"ehr_rejected: 422 error/business-rule [urn:x|E{i}] @ Observation.code",
        )
    settled = {patient, *obs}
    outbox.release(TARGET, [c.key for c in claimed if c.key not in settled], owner="w", now=now)
    return obs


def _sign_in(client: FlaskClient, key: str = ADMIN_KEY) -> Any:
    form = client.get("/ui/login")
    assert form.status_code == 200
    return client.post(
        "/ui/login", data={"csrf": csrf_of(form.get_data(as_text=True)), "api_key": key}
    )


def _set_cookie(resp: Any) -> str:
    cookies = [c for c in resp.headers.getlist("Set-Cookie") if c.startswith(f"{COOKIE_NAME}=")]
    assert len(cookies) == 1, resp.headers
    return str(cookies[0])


def _statuses(app: Flask) -> dict[tuple[str, str], str]:
    return {d.key: d.status for d in _outbox(app).deliveries(target=TARGET, limit=1000)}


# --------------------------------------------------------------------------- access


def test_without_a_session_the_browser_is_sent_to_sign_in(client: FlaskClient) -> None:
    resp = client.get("/ui")
    assert resp.status_code == 303
    assert resp.headers["Location"].endswith("/ui/login")
    # a form post without a session is refused outright (not redirected: it would be lost)
    resp = client.post(REPLAY_ALL, data={"csrf": "x"})
    assert resp.status_code == 401
    assert resp.get_json()["issue"][0]["code"] == "login"
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    # an API client that sends a wrong key gets 401, not a redirect to a form
    resp = client.get("/ui", headers={"X-API-Key": "fbk_" + "x" * 43})
    assert resp.status_code == 401


def test_api_keys_in_headers_work_and_need_sync_admin(client: FlaskClient) -> None:
    assert client.get("/ui", headers={"X-API-Key": ADMIN_KEY}).status_code == 200
    resp = client.get("/ui", headers={"X-API-Key": READER_KEY})
    assert resp.status_code == 403
    assert resp.get_json()["resourceType"] == "OperationOutcome"
    assert "sync.admin" in resp.get_json()["issue"][0]["diagnostics"]


def test_sign_in_sets_a_strict_http_only_session_for_eight_hours(client: FlaskClient) -> None:
    before = time.time()
    resp = _sign_in(client)
    assert resp.status_code == 303 and resp.headers["Location"].endswith("/ui")
    cookie = _set_cookie(resp)
    attributes = {a.strip().split("=")[0].lower(): a for a in cookie.split(";")[1:]}
    assert "httponly" in attributes
    assert attributes["samesite"].strip() == "SameSite=Strict"
    assert attributes["path"].strip() == "Path=/ui"  # never sent to /api or /fhir
    assert "secure" not in attributes  # plain http (loopback); see the https test
    expires = datetime.strptime(attributes["expires"].split("=", 1)[1], "%a, %d %b %Y %H:%M:%S GMT")
    lifetime = expires.replace(tzinfo=UTC).timestamp() - before
    assert abs(lifetime - LIFETIME.total_seconds()) < 60
    assert ADMIN_KEY not in cookie  # the key itself is never stored
    page = client.get("/ui", follow_redirects=True)
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert "ops-admin" in html and "Signed in as ops-admin." in html


def test_the_session_cookie_is_secure_over_https(client: FlaskClient) -> None:
    form = client.get("/ui/login", base_url="https://localhost")
    resp = client.post(
        "/ui/login",
        base_url="https://localhost",
        data={"csrf": csrf_of(form.get_data(as_text=True)), "api_key": ADMIN_KEY},
    )
    assert resp.status_code == 303
    assert "; Secure" in _set_cookie(resp)


def test_sign_in_refuses_unknown_keys_and_keys_without_sync_admin(client: FlaskClient) -> None:
    resp = _sign_in(client, "fbk_" + "n" * 43)
    assert resp.status_code == 401
    assert "This key is not accepted." in resp.get_data(as_text=True)
    resp = _sign_in(client, READER_KEY)
    assert resp.status_code == 403
    assert "needs the sync.admin scope" in resp.get_data(as_text=True)
    assert client.get("/ui").status_code == 303  # no session was made


def test_sign_in_needs_the_form_token(client: FlaskClient) -> None:
    client.get("/ui/login")
    resp = client.post("/ui/login", data={"api_key": ADMIN_KEY})
    assert resp.status_code == 400
    assert resp.get_json()["resourceType"] == "OperationOutcome"
    assert client.get("/ui").status_code == 303


def test_a_removed_key_ends_its_sessions(tmp_path: Path, app: Flask, client: FlaskClient) -> None:
    _sign_in(client)
    assert client.get("/ui").status_code == 200
    cookie = client.get_cookie(COOKIE_NAME, path="/ui")
    assert cookie is not None
    # the same service restarted (same session secret): the session still works...
    (tmp_path / "same").mkdir()
    same = make_app(tmp_path / "same")
    # ...and restarted with the admin key revoked: it does not
    (tmp_path / "revoked").mkdir()
    revoked = make_app(tmp_path / "revoked", keys=KEYS[1:])
    try:
        again = same.test_client()
        again.set_cookie(COOKIE_NAME, cookie.value, path="/ui")
        assert again.get("/ui").status_code == 200
        other = revoked.test_client()
        other.set_cookie(COOKIE_NAME, cookie.value, path="/ui")
        assert other.get("/ui").status_code == 303
    finally:
        same.extensions["fhirbridge"].store.close()
        revoked.extensions["fhirbridge"].store.close()


def test_an_expired_or_tampered_session_is_not_accepted(client: FlaskClient) -> None:
    _sign_in(client)
    assert client.get("/ui").status_code == 200
    with client.session_transaction() as session:
        session["exp"] = int(time.time()) - 1
    assert client.get("/ui").status_code == 303
    _sign_in(client)
    cookie = client.get_cookie(COOKIE_NAME, path="/ui")
    assert cookie is not None
    client.set_cookie(COOKIE_NAME, cookie.value[:-2] + "xx", path="/ui")
    assert client.get("/ui").status_code == 303


def test_sign_out(client: FlaskClient) -> None:
    _sign_in(client)
    page = client.get("/ui").get_data(as_text=True)
    resp = client.post("/ui/logout", data={"csrf": csrf_of(page)})
    assert resp.status_code == 303 and resp.headers["Location"].endswith("/ui/login")
    assert client.get("/ui").status_code == 303


# --------------------------------------------------------------------------- the console


def test_console_lists_dead_letters_and_replays_them(app: Flask, client: FlaskClient) -> None:
    body = _submit(client)
    dead = _dead_letters(app, body)
    _sign_in(client)
    html = client.get("/ui").get_data(as_text=True)
    assert_no_phi(html)
    for i, (rtype, rid) in enumerate(dead):
        assert f"{rtype}/{rid}" in html
        assert f"ehr_rejected: 422 error/business-rule [urn:x|E{i}] @ Observation.code" in html
    assert 'class="dead bad">2<' in html  # dead-letter count
    assert 'class="queue busy">24<' in html  # 24 queued, given back by the worker
    assert body["submissionId"] in html
    # one
    one = f"/ui/targets/{TARGET}/dead-letters/{dead[0][0]}/{dead[0][1]}/replay"
    resp = client.post(one, data={"csrf": csrf_of(html)})
    assert resp.status_code == 303
    assert resp.headers["Location"].endswith(f"/ui#target-{TARGET}")
    assert _statuses(app)[dead[0]] == "queued" and _statuses(app)[dead[1]] == "dead"
    after = client.get("/ui").get_data(as_text=True)
    assert f"{TARGET}: {dead[0][0]}/{dead[0][1]} queued again." in after
    assert 'class="dead bad">1<' in after
    # the same one again: nothing to replay, said so
    client.post(one, data={"csrf": csrf_of(after)})
    assert "that resource is not a dead letter" in client.get("/ui").get_data(as_text=True)
    # all
    resp = client.post(REPLAY_ALL, data={"csrf": csrf_of(after)})
    assert resp.status_code == 303
    assert _statuses(app)[dead[1]] == "queued"
    final = client.get("/ui").get_data(as_text=True)
    assert f"{TARGET}: 1 dead letter queued again." in final
    assert 'class="dead">0<' in final


def test_replay_needs_the_form_token(app: Flask, client: FlaskClient) -> None:
    dead = _dead_letters(app, _submit(client))
    _sign_in(client)
    one = f"/ui/targets/{TARGET}/dead-letters/{dead[0][0]}/{dead[0][1]}/replay"
    for data in ({}, {"csrf": "not-the-token"}):
        for url in (one, REPLAY_ALL):
            resp = client.post(url, data=data)
            assert resp.status_code == 400, url
            assert resp.get_json()["resourceType"] == "OperationOutcome"
    assert {_statuses(app)[k] for k in dead} == {"dead"}


def test_replay_of_an_unknown_target_is_404(client: FlaskClient) -> None:
    _sign_in(client)
    token = csrf_of(client.get("/ui").get_data(as_text=True))
    resp = client.post("/ui/targets/nope/dead-letters/replay", data={"csrf": token})
    assert resp.status_code == 404


def test_submission_page_shows_each_resource_per_target(app: Flask, client: FlaskClient) -> None:
    body = _submit(client)
    dead = _dead_letters(app, body)
    _sign_in(client)
    resp = client.get(f"/ui/submissions/{body['submissionId']}")
    assert resp.status_code == 200
    html = resp.get_data(as_text=True)
    assert_no_phi(html)
    assert html.count('class="delivery-row"') == 27
    assert "2 dead" in html and "1 sent" in html and "24 queued" in html
    assert f"{dead[0][0]}/{dead[0][1]}" in html
    assert client.get("/ui/submissions/no-such-id").status_code == 404


def test_security_headers_on_every_console_answer(client: FlaskClient) -> None:
    _sign_in(client)
    answers = [
        client.get("/ui"),
        client.get("/ui/login"),
        client.get("/ui/console.css"),
        client.post(REPLAY_ALL, data={}),  # 400
        client.get("/ui/submissions/nope"),  # 404
    ]
    for resp in answers:
        headers = resp.headers
        assert headers["Content-Security-Policy"].startswith("default-src 'self'"), resp
        assert "unsafe-inline" not in headers["Content-Security-Policy"]
        assert headers["X-Frame-Options"] == "DENY"
        assert headers["Referrer-Policy"] == "no-referrer"
        assert headers["Cache-Control"] == "no-store"
    page = answers[0].get_data(as_text=True)
    assert "<script" not in page and "style=" not in page  # nothing the CSP would block
    assert answers[2].mimetype == "text/css"


def test_without_authentication_the_console_is_open(tmp_path: Path) -> None:
    app = make_app(tmp_path, keys=None)
    try:
        client = app.test_client()
        dead = _dead_letters(app, _submit(client))
        page = client.get("/ui")
        assert page.status_code == 200
        html = page.get_data(as_text=True)
        assert "authentication off" in html
        assert "Authentication is not configured" in client.get("/ui/login").get_data(as_text=True)
        assert client.post(REPLAY_ALL, data={}).status_code == 400  # still needs the token
        assert client.post(REPLAY_ALL, data={"csrf": csrf_of(html)}).status_code == 303
        assert {_statuses(app)[k] for k in dead} == {"queued"}
    finally:
        app.extensions["fhirbridge"].store.close()
