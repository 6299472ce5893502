"""/api/v1/sync: status, dead letters and replay, and the per-submission delivery view.

The targets point at an unreachable loopback port and no worker runs: rows stay queued until
the test moves them through the outbox itself (claim, then record a result) as a worker would.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from flask.testing import FlaskClient

from fhirbridge import create_app
from fhirbridge.settings import Settings
from fhirbridge.sync.outbox import Outbox

ROOT = Path(__file__).resolve().parents[2]
DOC: dict[str, Any] = json.loads((ROOT / "mappings/fixtures/medicine-session.in.json").read_text())
SECRET = "sentinel-bearer-token-7f3a9c"  # must never appear in an answer
PATIENT_FAMILY = "Synthetic-Okafor"  # a patient value from the fixture
SPEC = yaml.safe_load((ROOT / "openapi.yaml").read_text())

TARGETS = """\
targets:
  - name: ehr
    base_url: http://127.0.0.1:9/fhir
    profile: generic-r4
    auth:
      type: bearer
      token: ${SYNC_API_TEST_TOKEN}
  - name: vitals
    base_url: http://127.0.0.1:9/vitals
    profile: generic-r4
    resource_types: [Observation]
"""


def _conforms(body: Any, schema_name: str) -> None:
    """The answer matches its schema in openapi.yaml."""
    schema = {**SPEC, "$ref": f"#/components/schemas/{schema_name}"}
    jsonschema.Draft202012Validator(schema).validate(body)


def _clean(resp: Any) -> None:
    text = resp.get_data(as_text=True)
    assert SECRET not in text
    assert PATIENT_FAMILY not in text


@pytest.fixture
def app_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FlaskClient]:
    monkeypatch.setenv("SYNC_API_TEST_TOKEN", SECRET)
    targets = tmp_path / "targets.yaml"
    targets.write_text(TARGETS)
    app = create_app(
        Settings(
            database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
            mappings_dir=ROOT / "mappings",
            targets=targets,
            db_auto_upgrade=True,
        )
    )
    with app.test_client() as client:
        yield client
    app.extensions["fhirbridge"].store.close()


def _outbox(client: FlaskClient) -> Outbox:
    outbox: Outbox = client.application.extensions["fhirbridge"].outbox
    return outbox


def _submit(client: FlaskClient) -> dict[str, Any]:
    resp = client.post("/api/v1/submissions", data=json.dumps(DOC), content_type="application/json")
    assert resp.status_code == 201, resp.json
    _conforms(resp.json, "SubmissionSummary")
    body: dict[str, Any] = resp.json
    return body


def _keys(body: dict[str, Any], rtype: str) -> list[tuple[str, str]]:
    return sorted(
        (r["resourceType"], r["id"]) for r in body["resources"] if r["resourceType"] == rtype
    )


def _work(client: FlaskClient, body: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Play a worker on target ehr: 2 dead letters, 1 retrying, 1 sent, the rest given back."""
    outbox = _outbox(client)
    now = datetime.now(UTC)
    claimed = outbox.claim("ehr", owner="test-worker", now=now)
    assert len(claimed) == 27
    obs = _keys(body, "Observation")
    dead1, dead2, retrying = obs[0], obs[1], obs[2]
    sent = _keys(body, "Patient")[0]

    def record(key: tuple[str, str], status: Any, seconds: int, **kw: Any) -> None:
        assert outbox.record(
            "ehr",
            key,
            owner="test-worker",
            version=1,
            status=status,
            now=now + timedelta(seconds=seconds),
            **kw,
        )

    record(sent, "sent", 1, server_id="srv-patient", server_version="1", action="put")
    record(dead1, "dead", 2, error="ehr_rejected 422: error/processing @ Observation.code")
    record(
        retrying,
        "retrying",
        3,
        error="ehr_unavailable 503",
        next_attempt_at=now + timedelta(minutes=5),
    )
    record(dead2, "dead", 4, error="ehr_rejected 400: error/invalid @ Observation.value[x]")
    settled = {dead1, dead2, retrying, sent}
    outbox.release(
        "ehr", [c.key for c in claimed if c.key not in settled], owner="test-worker", now=now
    )
    return {
        "dead1": dead1,
        "dead2": dead2,
        "retrying": retrying,
        "sent": sent,
    }


def _status(client: FlaskClient) -> dict[str, dict[str, Any]]:
    resp = client.get("/api/v1/sync/status")
    assert resp.status_code == 200
    _clean(resp)
    _conforms(resp.json, "SyncStatus")
    return {t["name"]: t for t in resp.json["targets"]}


def test_status_counts_last_success_and_last_error(app_client: FlaskClient) -> None:
    before = _status(app_client)
    assert list(before) == ["ehr", "vitals"]
    assert before["ehr"]["queued"] == 0 and before["ehr"]["lastSuccessAt"] is None

    body = _submit(app_client)
    queued = _status(app_client)
    assert queued["ehr"]["queued"] == 27
    assert queued["vitals"]["queued"] == 15  # 14 vital signs + the CAPS-5 score
    assert queued["ehr"]["oldestWaitingSeconds"] is not None

    keys = _work(app_client, body)
    status = _status(app_client)
    ehr = status["ehr"]
    counts = {k: ehr[k] for k in ("queued", "inFlight", "sent", "failed", "deadLettered")}
    assert counts == {"queued": 23, "inFlight": 0, "sent": 1, "failed": 1, "deadLettered": 2}
    assert ehr["waiting"] == ehr["fallback"] == ehr["skipped"] == 0
    assert ehr["configured"] is True
    assert ehr["baseUrl"] == "http://127.0.0.1:9/fhir" and ehr["profile"] == "generic-r4"
    assert ehr["lastSuccessAt"] is not None
    assert ehr["lastError"]["status"] == "dead"  # the newest failure
    assert (ehr["lastError"]["resourceType"], ehr["lastError"]["id"]) == keys["dead2"]
    assert ehr["lastError"]["error"] == "ehr_rejected 400: error/invalid @ Observation.value[x]"
    assert ehr["lastError"]["at"] > ehr["lastSuccessAt"]
    # the target's configuration, with the auth type only
    assert ehr["target"]["auth"] == {"type": "bearer"}
    assert ehr["target"]["name"] == "ehr"
    assert status["vitals"]["queued"] == 15 and status["vitals"]["lastError"] is None


def test_dead_letters_list_one_and_replay(app_client: FlaskClient) -> None:
    body = _submit(app_client)
    keys = _work(app_client, body)

    listed = app_client.get("/api/v1/sync/dead-letters")
    assert listed.status_code == 200
    _clean(listed)
    _conforms(listed.json, "DeadLetterPage")
    assert listed.json["total"] == 2 and listed.json["target"] is None
    letters = listed.json["deadLetters"]
    assert [(d["resourceType"], d["id"]) for d in letters] == [keys["dead2"], keys["dead1"]]
    assert {d["status"] for d in letters} == {"dead"} and {d["target"] for d in letters} == {"ehr"}
    assert letters[1]["lastError"] == "ehr_rejected 422: error/processing @ Observation.code"
    assert letters[1]["attempts"] == 1 and letters[1]["wantVersion"] == "1"

    page = app_client.get("/api/v1/sync/dead-letters?target=ehr&limit=1&offset=1").json
    assert page["total"] == 2 and page["limit"] == 1
    assert [(d["resourceType"], d["id"]) for d in page["deadLetters"]] == [keys["dead1"]]
    assert app_client.get("/api/v1/sync/dead-letters?target=vitals").json["total"] == 0
    for bad in ("limit=0", "limit=many", "offset=-1"):
        resp = app_client.get(f"/api/v1/sync/dead-letters?{bad}")
        assert resp.status_code == 400 and resp.json["resourceType"] == "OperationOutcome"

    rtype, rid = keys["dead1"]
    one = app_client.get(f"/api/v1/sync/dead-letters/ehr/{rtype}/{rid}")
    assert one.status_code == 200
    _conforms(one.json, "Delivery")
    assert one.json["status"] == "dead" and one.json["id"] == rid
    # a row that is not dead-lettered, a resource with no row, another target's view
    for path in (
        f"ehr/{keys['retrying'][0]}/{keys['retrying'][1]}",
        "ehr/Observation/no-such-id",
        f"vitals/{rtype}/{rid}",
    ):
        resp = app_client.get(f"/api/v1/sync/dead-letters/{path}")
        assert resp.status_code == 404, path
        _conforms(resp.json, "OperationOutcome")

    replayed = app_client.post(f"/api/v1/sync/dead-letters/ehr/{rtype}/{rid}/replay")
    assert replayed.status_code == 200
    _conforms(replayed.json, "ReplayResult")
    assert replayed.json == {"target": "ehr", "replayed": 1}
    again = app_client.post(f"/api/v1/sync/dead-letters/ehr/{rtype}/{rid}/replay")
    assert again.status_code == 404 and again.json["resourceType"] == "OperationOutcome"
    row = _outbox(app_client).ledger("ehr", [keys["dead1"]])[keys["dead1"]]
    assert (row.status, row.attempts) == ("queued", 0)

    assert app_client.post("/api/v1/sync/dead-letters/ehr/replay").json == {
        "target": "ehr",
        "replayed": 1,
    }
    assert app_client.post("/api/v1/sync/dead-letters/ehr/replay").json["replayed"] == 0
    assert app_client.get("/api/v1/sync/dead-letters").json["total"] == 0
    assert _status(app_client)["ehr"]["queued"] == 25


def test_unknown_target_is_404(app_client: FlaskClient) -> None:
    for method, path in (
        ("get", "/api/v1/sync/dead-letters?target=nope"),
        ("get", "/api/v1/sync/dead-letters/nope/Observation/x"),
        ("post", "/api/v1/sync/dead-letters/nope/replay"),
        ("post", "/api/v1/sync/dead-letters/nope/Observation/x/replay"),
    ):
        resp = getattr(app_client, method)(path)
        assert resp.status_code == 404, path
        assert resp.json["issue"][0]["code"] == "not-found"
    assert app_client.get("/api/v1/sync/dead-letters/ehr/replay").status_code == 405


def test_submission_shows_delivery_per_target_and_resource(app_client: FlaskClient) -> None:
    body = _submit(app_client)
    keys = _work(app_client, body)
    resp = app_client.get(f"/api/v1/submissions/{body['submissionId']}")
    assert resp.status_code == 200
    _clean(resp)
    _conforms(resp.json, "SubmissionRecord")
    delivery = resp.json["delivery"]
    assert set(delivery) == {"ehr", "vitals"}
    ehr = {(d["resourceType"], d["id"]): d for d in delivery["ehr"]}
    assert set(ehr) == {(r["resourceType"], r["id"]) for r in body["resources"]}
    assert ehr[keys["sent"]]["status"] == "sent"
    assert ehr[keys["sent"]]["serverId"] == "srv-patient"
    assert ehr[keys["sent"]]["sentVersion"] == "1"
    assert ehr[keys["dead1"]]["status"] == "dead"
    assert ehr[keys["dead1"]]["lastError"].startswith("ehr_rejected 422")
    assert ehr[keys["retrying"]]["status"] == "retrying"
    assert ehr[keys["retrying"]]["attempts"] == 1
    assert ehr[keys["retrying"]]["nextAttemptAt"] > ehr[keys["retrying"]]["updatedAt"]
    assert "target" not in ehr[keys["sent"]]
    assert {d["resourceType"] for d in delivery["vitals"]} == {"Observation"}
    assert len(delivery["vitals"]) == 15


def test_without_targets_status_is_empty(tmp_path: Path) -> None:
    app = create_app(
        Settings(
            database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
            mappings_dir=ROOT / "mappings",
            db_auto_upgrade=True,
        )
    )
    try:
        with app.test_client() as client:
            assert client.get("/api/v1/sync/status").json["targets"] == []
            assert client.get("/api/v1/sync/dead-letters").json["total"] == 0
            body = _submit(client)
            got = client.get(f"/api/v1/submissions/{body['submissionId']}").json
            assert got["delivery"] == {}
            assert client.post("/api/v1/sync/dead-letters/ehr/replay").status_code == 404
    finally:
        app.extensions["fhirbridge"].store.close()
