"""The audit trail through create_app: who did what, when, with what outcome; readable by
sync.admin only; never a search value or a patient detail inside."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import text

from fhirbridge import audit, create_app
from fhirbridge.api.access import FHIR_READ, SYNC_ADMIN, access_of
from fhirbridge.fhir.validate import OutputValidator
from fhirbridge.settings import Settings
from fhirbridge.store.query import parse_search
from fhirbridge.store.resources import ResourceStore

ROOT = Path(__file__).resolve().parents[2]
DOC: dict[str, Any] = json.loads((ROOT / "mappings/fixtures/medicine-session.in.json").read_text())
# Patient details of the fixture that must never reach an AuditEvent.
MRN = DOC["patient"]["mrn"]
PHI = (MRN, DOC["patient"]["name"]["family"], DOC["patient"]["birthDate"])
TARGETS = """\
targets:
  - name: ehr
    base_url: http://127.0.0.1:9/fhir
    profile: generic-r4
"""


def _key() -> str:
    return "fbk_" + secrets.token_urlsafe(32)


WRITE_KEY, READ_KEY, ADMIN_KEY = _key(), _key(), _key()


def _entry(key: str, client_id: str, scopes: list[str]) -> dict[str, Any]:
    return {
        "client_id": client_id,
        "sha256": hashlib.sha256(key.encode()).hexdigest(),
        "scopes": scopes,
    }


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    targets = tmp_path / "targets.yaml"
    targets.write_text(TARGETS)
    app = create_app(
        Settings(
            database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
            mappings_dir=ROOT / "mappings",
            db_auto_upgrade=True,
            base_url="https://fhirbridge.example.org/fhir",
            targets=targets,
            auth_api_keys=[
                _entry(WRITE_KEY, "clinic-a-etl", ["submissions.write"]),
                _entry(READ_KEY, "partner-ehr", ["fhir.read"]),
                _entry(ADMIN_KEY, "ops", ["fhir.read", "sync.admin"]),
            ],
        )
    )
    yield app
    app.extensions["fhirbridge"].store.close()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def _as(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


def _store(app: Flask) -> ResourceStore:
    store: ResourceStore = app.extensions["fhirbridge"].store
    return store


def _events(app: Flask) -> list[dict[str, Any]]:
    """Every AuditEvent, oldest first, read from the store (reading them over HTTP would add
    one)."""
    page = _store(app).search(
        "AuditEvent", parse_search("AuditEvent", [("_sort", "date"), ("_count", "500")])
    )
    return page.resources


def _raw_events(app: Flask) -> str:
    with _store(app).engine.connect() as conn:
        rows = conn.execute(
            text("SELECT content FROM fhir_resource WHERE resource_type = 'AuditEvent'")
        ).scalars()
        return "\n".join(rows)


def _post(client: FlaskClient, doc: Any, key: str = WRITE_KEY) -> Any:
    return client.post(
        "/api/v1/submissions",
        data=json.dumps(doc),
        content_type="application/json",
        headers=_as(key),
    )


def _who(event: dict[str, Any]) -> str:
    return str(event["agent"][0]["who"]["identifier"]["value"])


def _subtype(event: dict[str, Any]) -> str:
    code: str = event["subtype"][0]["code"]
    return code


def _refs(event: dict[str, Any]) -> list[str]:
    return [
        e["what"]["reference"] for e in event.get("entity", []) if "reference" in e.get("what", {})
    ]


def _valid(event: dict[str, Any]) -> None:
    assert OutputValidator().validate(event) == [], event


def _patient_id(body: dict[str, Any]) -> str:
    return str(next(r["id"] for r in body["resources"] if r["resourceType"] == "Patient"))


def _body(response: Any) -> Any:
    return orjson.loads(response.data)


# --------------------------------------------------------------------------- submissions


def test_an_accepted_submission_is_audited_with_every_resource_it_stored(
    app: Flask, client: FlaskClient
) -> None:
    first = _post(client, DOC)
    assert first.status_code == 201, first.json
    [event] = _events(app)
    _valid(event)
    assert (_subtype(event), event["action"], event["outcome"]) == ("create", "C", "0")
    assert _who(event) == "clinic-a-etl" and event["agent"][0]["requestor"] is True
    assert event["source"]["site"] == "https://fhirbridge.example.org/fhir"
    stored = [f"{r['resourceType']}/{r['id']}/_history/1" for r in _body(first)["resources"]]
    assert _refs(event) == stored and len(stored) == 27
    assert event["entity"][0]["what"]["identifier"] == {
        "system": "urn:fhirbridge:submission",
        "value": _body(first)["submissionId"],
    }
    # posted again: nothing changed, still audited (an update that wrote nothing)
    assert _post(client, DOC).status_code == 200
    events = _events(app)
    assert [(_subtype(e), e["action"]) for e in events] == [("create", "C"), ("update", "U")]
    # the audit record is not queued for delivery; the 27 resources are
    delivered = app.extensions["fhirbridge"].outbox.deliveries(limit=1000)
    assert len(delivered) == 27
    assert all(d.resource_type != "AuditEvent" for d in delivered)
    for phi in PHI:
        assert phi not in _raw_events(app)


def test_a_rejected_submission_is_audited_as_a_failure_without_its_content(
    app: Flask, client: FlaskClient
) -> None:
    bad = copy.deepcopy(DOC)
    bad["sessions"][0]["type"] = "not-a-session-type"
    assert _post(client, bad).status_code == 422
    malformed = client.post(
        "/api/v1/submissions",
        data=b'{"patient": {"mrn": "MRN-448812"',
        content_type="application/json",
        headers=_as(WRITE_KEY),
    )
    assert malformed.status_code == 400
    events = _events(app)
    assert [(e["outcome"], e.get("outcomeDesc")) for e in events] == [
        ("4", "HTTP 422"),
        ("4", "HTTP 400"),
    ]
    for event in events:
        _valid(event)
        assert (_subtype(event), event["action"], _who(event)) == ("create", "C", "clinic-a-etl")
        assert "entity" not in event
    raw = _raw_events(app)
    for phi in (*PHI, "not-a-session-type"):
        assert phi not in raw


def test_a_submission_and_its_audit_record_commit_together(app: Flask, client: FlaskClient) -> None:
    # The audit insert fails inside the submission's transaction: nothing is stored.
    with _store(app).engine.begin() as conn:
        conn.execute(
            text(
                "CREATE TRIGGER no_audit BEFORE INSERT ON fhir_resource "
                "WHEN NEW.resource_type = 'AuditEvent' BEGIN SELECT RAISE(ABORT, 'no'); END"
            )
        )
    response = _post(client, DOC)
    assert response.status_code == 500
    with _store(app).engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM fhir_resource")).scalar_one() == 0
        assert conn.execute(text("SELECT count(*) FROM submission")).scalar_one() == 0


# --------------------------------------------------------------------------- reads and searches


def test_reads_and_searches_are_audited_with_ids_and_parameter_names_only(
    app: Flask, client: FlaskClient
) -> None:
    patient = _patient_id(_post(client, DOC).json)
    assert client.get(f"/fhir/Patient/{patient}", headers=_as(READ_KEY)).status_code == 200
    assert (
        client.get(f"/fhir/Patient/{patient}/_history/1", headers=_as(READ_KEY)).status_code == 200
    )
    assert client.get(f"/fhir/Patient/{patient}/_history", headers=_as(READ_KEY)).status_code == 200
    found = client.get(
        "/fhir/Patient",
        query_string={"identifier": MRN, "_count": "5"},
        headers=_as(READ_KEY),
    )
    assert found.status_code == 200 and _body(found)["total"] == 1
    posted = client.post(
        "/fhir/Observation/_search",
        data={
            "subject:Patient": patient,
            "code": "http://loinc.org|8867-4",
            "birthdate": DOC["patient"]["birthDate"],
        },
        headers=_as(READ_KEY),
    )
    assert posted.status_code == 200
    _, read, vread, history, search, search_post = _events(app)
    for event in (read, vread, history, search, search_post):
        _valid(event)
        assert (_who(event), event["outcome"]) == ("partner-ehr", "0")
        assert event["agent"][0]["network"] == {"address": "127.0.0.1", "type": "2"}
    assert (_subtype(read), read["action"]) == ("read", "R")
    assert _refs(read) == [f"Patient/{patient}/_history/1"]
    assert (_subtype(vread), _subtype(history)) == ("vread", "history-instance")
    assert _refs(vread) == _refs(history) == [f"Patient/{patient}/_history/1"]
    assert (_subtype(search), search["action"]) == ("search-type", "E")
    query = search["entity"][0]
    assert query["type"]["code"] == "Patient" and query["role"]["code"] == "24"
    assert query["detail"] == [
        {"type": "parameters", "valueString": "identifier"},
        {"type": "total", "valueString": "1"},
        {"type": "returned", "valueString": "1"},
    ]
    assert _refs(search) == [f"Patient/{patient}/_history/1"]
    # known parameters by name (modifiers dropped), unknown ones not at all
    post_query = search_post["entity"][0]
    assert post_query["detail"][0] == {"type": "parameters", "valueString": "code,subject"}
    heart_rates = int(post_query["detail"][1]["valueString"])
    assert heart_rates > 0 and len(_refs(search_post)) == heart_rates
    raw = _raw_events(app)
    for phi in (*PHI, "8867-4", "birthdate"):
        assert phi not in raw


def test_a_failed_read_is_audited_without_the_id_that_was_asked_for(
    app: Flask, client: FlaskClient
) -> None:
    assert client.get("/fhir/Patient/MRN-448812", headers=_as(READ_KEY)).status_code == 404
    assert client.get("/fhir/Patient?birthdate=x", headers=_as(READ_KEY)).status_code == 200
    assert (
        client.get("/fhir/Observation?date=1984-07-19T99", headers=_as(READ_KEY)).status_code == 400
    )
    missing, _, malformed = _events(app)
    assert (_subtype(missing), missing["outcome"], missing["outcomeDesc"]) == (
        "read",
        "4",
        "HTTP 404",
    )
    assert "entity" not in missing
    assert (malformed["outcome"], malformed["outcomeDesc"]) == ("4", "HTTP 400")
    assert "entity" not in malformed
    raw = _raw_events(app)
    assert MRN not in raw and "1984-07-19" not in raw and "birthdate" not in raw


def test_everything_is_audited_and_never_returns_the_audit_trail(
    app: Flask, client: FlaskClient
) -> None:
    patient = _patient_id(_post(client, DOC).json)
    client.get(f"/fhir/Patient/{patient}", headers=_as(READ_KEY))
    everything = client.get(f"/fhir/Patient/{patient}/$everything", headers=_as(READ_KEY))
    assert everything.status_code == 200
    types = {e["resource"]["resourceType"] for e in _body(everything)["entry"]}
    assert "AuditEvent" not in types and "Patient" in types
    refused = client.get(
        f"/fhir/Patient/{patient}/$everything?_type=AuditEvent", headers=_as(ADMIN_KEY)
    )
    assert refused.status_code == 400
    event = _events(app)[2]
    _valid(event)
    assert (_subtype(event), event["action"]) == ("operation", "E")
    assert f"Patient/{patient}/_history/1" in _refs(event)
    assert event["entity"][0]["detail"][-1] == {
        "type": "returned",
        "valueString": str(len(_body(everything)["entry"])),
    }


def test_conceptmap_reads_are_audited(app: Flask, client: FlaskClient) -> None:
    bundle = client.get("/fhir/ConceptMap?_count=1", headers=_as(READ_KEY)).get_json()
    rid = bundle["entry"][0]["resource"]["id"]
    assert client.get(f"/fhir/ConceptMap/{rid}", headers=_as(READ_KEY)).status_code == 200
    search, read = _events(app)
    assert _subtype(search) == "search-type" and _refs(search) == [f"ConceptMap/{rid}"]
    assert _subtype(read) == "read" and _refs(read) == [f"ConceptMap/{rid}"]


def test_submission_summary_and_transform_are_audited(app: Flask, client: FlaskClient) -> None:
    posted = _post(client, DOC).json
    sid = posted["submissionId"]
    assert client.get(f"/api/v1/submissions/{sid}", headers=_as(WRITE_KEY)).status_code == 200
    transformed = client.post(
        "/api/v1/$transform",
        data=json.dumps(DOC),
        content_type="application/json",
        headers=_as(WRITE_KEY),
    )
    assert transformed.status_code == 200
    _, summary, transform = _events(app)
    assert (_subtype(summary), summary["action"]) == ("read", "R")
    assert summary["entity"][0]["what"]["identifier"]["value"] == sid
    assert f"Patient/{_patient_id(posted)}" in _refs(summary)
    assert (_subtype(transform), transform["action"], transform["outcome"]) == (
        "operation",
        "E",
        "0",
    )
    assert "entity" not in transform  # it stored nothing


def test_every_data_view_declares_its_audit(app: Flask) -> None:
    for endpoint, view in app.view_functions.items():
        blueprint = endpoint.partition(".")[0]
        if blueprint in ("fhir", "terminology", "submissions") and endpoint != "fhir.metadata":
            assert audit.audit_of(view) is not None, endpoint
    assert audit.audit_of(app.view_functions["fhir.metadata"]) is None


def test_a_read_whose_audit_cannot_be_written_is_not_served(
    app: Flask, client: FlaskClient
) -> None:
    patient = _patient_id(_post(client, DOC).json)
    with _store(app).engine.begin() as conn:
        conn.execute(
            text(
                "CREATE TRIGGER no_audit BEFORE INSERT ON fhir_resource "
                "WHEN NEW.resource_type = 'AuditEvent' BEGIN SELECT RAISE(ABORT, 'no'); END"
            )
        )
    response = client.get(f"/fhir/Patient/{patient}", headers=_as(READ_KEY))
    assert response.status_code == 503
    body = orjson.loads(response.data)
    assert body["resourceType"] == "OperationOutcome"
    assert patient not in response.get_data(as_text=True)
    # an error stays the error it was
    assert client.get("/fhir/Patient/nope", headers=_as(READ_KEY)).status_code == 404


# --------------------------------------------------------------------------- /fhir/AuditEvent


def test_the_audit_trail_is_for_sync_admin(app: Flask, client: FlaskClient) -> None:
    # the rule itself, as the views declare it
    for endpoint in ("fhir.read", "fhir.vread", "fhir.history", "fhir.search", "fhir.search_post"):
        rule = access_of(app.view_functions[endpoint])
        assert rule is not None
        assert rule.scope_for({"rtype": "AuditEvent"}) == SYNC_ADMIN
        assert rule.scope_for({"rtype": "Patient"}) == FHIR_READ
    # and through the authentication hook
    patient = _patient_id(_post(client, DOC).json)
    refused = client.get("/fhir/AuditEvent", headers=_as(READ_KEY))
    assert refused.status_code == 403
    assert client.get("/fhir/AuditEvent").status_code == 401
    bundle = client.get(
        "/fhir/AuditEvent",
        query_string={"entity": f"Patient/{patient}", "_sort": "date"},
        headers=_as(ADMIN_KEY),
    )
    assert bundle.status_code == 200
    # the submission is the only event naming the patient (the refusals named nothing)
    [entry] = _body(bundle)["entry"]
    assert _who(entry["resource"]) == "clinic-a-etl"
    refusals = client.get(
        "/fhir/AuditEvent", query_string={"outcome": "4"}, headers=_as(ADMIN_KEY)
    ).get_json()
    assert sorted(_who(e["resource"]) for e in refusals["entry"]) == ["anonymous", "partner-ehr"]
    by_client = client.get(
        "/fhir/AuditEvent", query_string={"altid": "clinic-a-etl"}, headers=_as(ADMIN_KEY)
    ).get_json()
    assert by_client["total"] == 1
    rid = entry["resource"]["id"]
    assert (
        client.get(f"/fhir/AuditEvent/{rid}", headers=_as(ADMIN_KEY)).get_json()
        == entry["resource"]
    )
    assert client.get(f"/fhir/AuditEvent/{rid}", headers=_as(READ_KEY)).status_code == 403
    history = client.get(f"/fhir/AuditEvent/{rid}/_history", headers=_as(ADMIN_KEY)).get_json()
    assert history["total"] == 1


def test_reading_the_audit_trail_adds_one_event_per_request(
    app: Flask, client: FlaskClient
) -> None:
    _post(client, DOC)
    before = len(_events(app))
    bundle = client.get("/fhir/AuditEvent", headers=_as(ADMIN_KEY)).get_json()
    assert bundle["total"] == before  # the event of this very read is written after it
    assert len(_events(app)) == before + 1
    last = _events(app)[-1]
    assert (_who(last), _subtype(last)) == ("ops", "search-type")
    assert _refs(last) == [f"AuditEvent/{e['resource']['id']}/_history/1" for e in bundle["entry"]]


def test_the_503_of_an_unwritable_audit_record_is_documented(app: Flask) -> None:
    spec = yaml.safe_load((ROOT / "openapi.yaml").read_text())
    documented = {re.sub(r"\{[^}]+\}", "{}", p): ops for p, ops in spec["paths"].items()}
    checked = 0
    for rule in app.url_map.iter_rules():
        if audit.audit_of(app.view_functions[rule.endpoint]) is None:
            continue
        if rule.rule == "/api/v1/submissions":
            continue  # audited in its own transaction: a failed audit write is its 500
        operations = documented[re.sub(r"<[^>]+>", "{}", rule.rule)]
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            assert "503" in operations[method.lower()]["responses"], (rule.rule, method)
            checked += 1
    assert checked == 11
