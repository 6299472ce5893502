"""The whole service through create_app: submissions in, FHIR out, errors as OperationOutcome."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from fhirbridge import create_app
from fhirbridge.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOC: dict[str, Any] = json.loads((ROOT / "mappings/fixtures/medicine-session.in.json").read_text())
LOINC_HR = "http://loinc.org|8867-4"


@pytest.fixture
def client(tmp_path: Path) -> Iterator[FlaskClient]:
    app = create_app(
        Settings(
            database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
            mappings_dir=ROOT / "mappings",
            db_auto_upgrade=True,
        )
    )
    with app.test_client() as test_client:
        yield test_client
    app.extensions["fhirbridge"].store.close()


def _post(client: FlaskClient, doc: Any, path: str = "/api/v1/submissions", **kw: Any) -> Any:
    return client.post(path, data=json.dumps(doc), content_type="application/json", **kw)


def _versions(body: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {
        f"{r['resourceType']}/{r['id']}": (r["versionId"], r["outcome"]) for r in body["resources"]
    }


def test_post_then_repost_then_change(client: FlaskClient) -> None:
    first = _post(client, DOC)
    assert first.status_code == 201, first.json
    body = first.json
    assert body["outcome"] == "accepted"
    assert len(body["resources"]) == 27
    assert {v for v in _versions(body).values()} == {("1", "created")}
    assert first.headers["Location"] == f"/api/v1/submissions/{body['submissionId']}"
    # per source record, what it produced
    records = {r["record"]: r for r in body["records"]}
    assert [p["resourceType"] for p in records["$.vitals[2]"]["produced"]] == ["Observation"] * 5
    assert records["$.doses[1]"]["sourceId"] == "d-2"
    assert body["unmappedTerms"] == [{"table": "adverse-event-terms", "count": 1}]

    again = _post(client, DOC)
    assert again.status_code == 200
    assert again.json["outcome"] == "unchanged"
    assert again.json["submissionId"] == body["submissionId"]
    assert _versions(again.json) == {k: ("1", "unchanged") for k in _versions(body)}

    changed = copy.deepcopy(DOC)
    changed["vitals"][0]["heartRate"] = 75
    third = _post(client, changed)
    assert third.status_code == 201
    outcomes = _versions(third.json)
    updated = [k for k, v in outcomes.items() if v == ("2", "updated")]
    created = [k for k, v in outcomes.items() if v == ("1", "created")]
    assert len(updated) == 1 and updated[0].startswith("Observation/")
    assert len(created) == 1 and created[0].startswith("Provenance/")  # one per import
    assert sum(v == ("1", "unchanged") for v in outcomes.values()) == 25

    hr = client.get(f"/fhir/{updated[0]}")
    assert hr.status_code == 200
    assert hr.json["valueQuantity"]["value"] == 75
    assert hr.headers["ETag"] == 'W/"2"'
    old = client.get(f"/fhir/{updated[0]}/_history/1")
    assert old.json["valueQuantity"]["value"] == 72

    # Re-posting the original applies its values again: the source is the truth.
    fourth = _post(client, DOC)
    assert fourth.status_code == 201
    assert _versions(fourth.json)[updated[0]] == ("3", "updated")
    assert client.get(f"/fhir/{updated[0]}").json["valueQuantity"]["value"] == 72


def test_read_api_returns_what_was_submitted(client: FlaskClient) -> None:
    body = _post(client, DOC).json
    patient_id = next(r["id"] for r in body["resources"] if r["resourceType"] == "Patient")
    patient = client.get(f"/fhir/Patient/{patient_id}")
    assert patient.status_code == 200
    assert patient.headers["Content-Type"].startswith("application/fhir+json")
    assert patient.json["name"][0]["family"] == "Synthetic-Okafor"
    assert patient.json["meta"]["versionId"] == "1"

    hr = client.get(f"/fhir/Observation?patient=Patient/{patient_id}&code={LOINC_HR}")
    assert hr.status_code == 200 and hr.json["total"] == 4
    values = sorted(e["resource"]["valueQuantity"]["value"] for e in hr.json["entry"])
    assert values == [72, 80, 96, 104]
    by_ident = client.get(
        "/fhir/Observation?identifier=urn:fhirbridge:clinic-a:vital-heart-rate|v-3"
    )
    assert by_ident.json["total"] == 1
    dated = client.get(
        f"/fhir/Observation?subject={patient_id}&date=ge2026-03-02T11:00:00-05:00"
        f"&date=lt2026-03-02T14:00:00-05:00&code={LOINC_HR}"
    )
    assert [e["resource"]["valueQuantity"]["value"] for e in dated.json["entry"]] in (
        [96, 104],
        [104, 96],
    )
    encounter_id = next(r["id"] for r in body["resources"] if r["resourceType"] == "Encounter")
    ma = client.get(f"/fhir/MedicationAdministration?context=Encounter/{encounter_id}")
    assert ma.json["total"] == 2
    everything = client.get(f"/fhir/Patient/{patient_id}/$everything")
    assert everything.status_code == 200
    types = {e["resource"]["resourceType"] for e in everything.json["entry"]}
    assert {
        "Patient",
        "Encounter",
        "Observation",
        "AdverseEvent",
        "MedicationAdministration",
        "Practitioner",
        "Medication",
    } <= types


def test_return_bundle(client: FlaskClient) -> None:
    resp = _post(client, DOC, "/api/v1/submissions?return=bundle")
    assert resp.status_code == 201
    assert resp.headers["Content-Type"].startswith("application/fhir+json")
    bundle = resp.json
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "transaction"
    assert len(bundle["entry"]) == 27
    assert all(e["resource"]["meta"]["versionId"] == "1" for e in bundle["entry"])
    again = _post(client, DOC, "/api/v1/submissions?return=bundle")
    assert again.status_code == 200 and len(again.json["entry"]) == 27


def test_transform_stores_nothing_and_traces(client: FlaskClient) -> None:
    resp = _post(client, DOC, "/api/v1/$transform")
    assert resp.status_code == 200
    bundle = resp.json
    assert bundle["type"] == "transaction" and len(bundle["entry"]) == 27
    patient = bundle["entry"][0]["resource"]
    assert client.get(f"/fhir/Patient/{patient['id']}").status_code == 404

    traced = _post(client, DOC, "/api/v1/$transform?trace=true").json
    assert traced["bundle"]["entry"][0]["resource"]["id"] == patient["id"]
    rows = traced["trace"][f"Patient/{patient['id']}"]
    family = next(r for r in rows if r["path"] == "Patient.name[0].family")
    assert family["file"] == "rules/patient.Patient.yaml" and family["rule"] == "patient"
    assert family["pointer"] == "/rules/0/template/name/0/family" and family["line"] > 0


def test_submission_summary_is_kept(client: FlaskClient) -> None:
    body = _post(client, DOC).json
    got = client.get(f"/api/v1/submissions/{body['submissionId']}")
    assert got.status_code == 200
    assert got.json["submissionId"] == body["submissionId"]
    assert got.json["summary"]["records"] == body["records"]
    missing = client.get("/api/v1/submissions/nope")
    assert missing.status_code == 404 and missing.json["resourceType"] == "OperationOutcome"


def _outcome(resp: Any, status: int) -> list[dict[str, Any]]:
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.headers["Content-Type"].startswith("application/fhir+json")
    assert resp.json["resourceType"] == "OperationOutcome"
    issues: list[dict[str, Any]] = resp.json["issue"]
    return issues


@pytest.mark.parametrize("path", ["/api/v1/submissions", "/api/v1/$transform"])
def test_bad_requests(client: FlaskClient, path: str) -> None:
    _outcome(client.post(path, data="{", content_type="application/json"), 400)
    _outcome(client.post(path, data=json.dumps(DOC), content_type="text/plain"), 415)
    for doc in ([], "text", None, 42, {}):
        _outcome(_post(client, doc, path), 422)


def test_invalid_document_lists_every_problem_and_stores_nothing(client: FlaskClient) -> None:
    bad = copy.deepcopy(DOC)
    bad["sessions"][0]["type"] = "ceremony"
    bad["doses"][1]["sessionId"] = "s-nope"
    bad["vitals"][0]["takenAt"] = "2026-03-02T09:20:00"
    bad["sessions"][0]["end"] = "2026-03-01T00:00:00-05:00"
    bad["adverseEvents"][0]["suspectDoseIds"] = ["d-x"]
    bad["sessions"][0]["therapists"].append("t-x")
    bad["vitals"][1]["id"] = "v-1"
    issues = _outcome(_post(client, bad), 422)
    paths = {i["expression"][0] for i in issues}
    # doses[0] now sits in a session that is no longer a medicine session: also reported
    assert paths == {
        "sessions[0].type",
        "doses[1].sessionId",
        "vitals[0].takenAt",
        "doses[0].sessionId",
        "sessions[0].end",
        "adverseEvents[0].suspectDoseIds[0]",
        "sessions[0].therapists[2]",
        "vitals[1].id",
    }
    patient_id = _post(client, DOC, "/api/v1/$transform").json["entry"][0]["resource"]["id"]
    assert client.get(f"/fhir/Patient/{patient_id}").status_code == 404


def test_bad_return_parameter(client: FlaskClient) -> None:
    _outcome(_post(client, DOC, "/api/v1/submissions?return=xml"), 400)


def test_unknown_route_and_method_are_operation_outcomes(client: FlaskClient) -> None:
    _outcome(client.get("/nope"), 404)
    _outcome(client.get("/api/v1/submissions"), 405)


def test_health(client: FlaskClient) -> None:
    assert client.get("/healthz").json == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json["checks"] == {"database": True, "mappings": True, "migrations": True}
