"""The FHIR R4 read API (/fhir) on a minimal Flask app around the blueprint and a SQLite store."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson
import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from fhirbridge.api import fhir, problems
from fhirbridge.api.http import Services
from fhirbridge.settings import Settings
from fhirbridge.store.resources import ResourceStore
from fhirbridge.store.search_params import PARAMS, SUPPORTED_TYPES

FHIR_JSON = "application/fhir+json; charset=utf-8"
T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
T1 = datetime(2026, 3, 2, 12, 0, 0, tzinfo=UTC)

PATIENT = "0b7e4d1c-8a36-4c1e-9f2b-3d5a6c7e8f01"
ENCOUNTER = "1c8f5e2d-9b47-4d2f-8a3c-4e6b7d8f9a02"
HEART_RATE = "2d906f3e-ac58-4e30-9b4d-5f7c8e9a0b03"
BLOOD_PRESSURE = "3ea1704f-bd69-4f41-8c5e-608d9fab1c04"
ADVERSE_EVENT = "4fb28150-ce7a-4052-9d6f-719eab0c2d05"
ADMINISTRATION = "50c39261-df8b-4163-8e70-82afbc1d3e06"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
VITALS = {
    "coding": [
        {
            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
            "code": "vital-signs",
        }
    ]
}
SUBJECT = {"reference": f"Patient/{PATIENT}"}
CONTEXT = {"reference": f"Encounter/{ENCOUNTER}"}


def _patient() -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": PATIENT,
        "meta": {"security": [{"system": "http://x.org/conf", "code": "R"}]},
        "identifier": [{"system": "urn:oid:1.2.3.4", "value": "MRN-77"}],
        "gender": "male",
        "birthDate": "1975-01-02",
    }


def _heart_rate(value: int) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": HEART_RATE,
        "status": "final",
        "category": [VITALS],
        "code": {"coding": [{"system": LOINC, "code": "8867-4", "display": "Heart rate"}]},
        "subject": SUBJECT,
        "encounter": CONTEXT,
        "effectiveDateTime": "2026-03-01T10:30:00+01:00",
        "valueQuantity": {
            "value": value,
            "unit": "beats/minute",
            "system": "http://unitsofmeasure.org",
            "code": "/min",
        },
    }


def _seed() -> list[dict[str, Any]]:
    return [
        _patient(),
        {
            "resourceType": "Encounter",
            "id": ENCOUNTER,
            "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "subject": SUBJECT,
            "period": {"start": "2026-03-01T09:00:00+01:00", "end": "2026-03-01T17:00:00+01:00"},
        },
        _heart_rate(64),
        {
            "resourceType": "Observation",
            "id": BLOOD_PRESSURE,
            "status": "final",
            "category": [VITALS],
            "code": {"coding": [{"system": LOINC, "code": "85354-9"}]},
            "subject": SUBJECT,
            "encounter": CONTEXT,
            "effectiveDateTime": "2026-03-01T11:00:00+01:00",
            "component": [
                {
                    "code": {"coding": [{"system": LOINC, "code": "8480-6"}]},
                    "valueQuantity": {"value": 128, "unit": "mmHg"},
                },
                {
                    "code": {"coding": [{"system": LOINC, "code": "8462-4"}]},
                    "valueQuantity": {"value": 84, "unit": "mmHg"},
                },
            ],
        },
        {
            "resourceType": "AdverseEvent",
            "id": ADVERSE_EVENT,
            "actuality": "actual",
            "event": {"coding": [{"system": SNOMED, "code": "422587007", "display": "Nausea"}]},
            "subject": SUBJECT,
            "date": "2026-03-01T12:15:00+01:00",
        },
        {
            "resourceType": "MedicationAdministration",
            "id": ADMINISTRATION,
            "status": "completed",
            "medicationCodeableConcept": {"coding": [{"system": SNOMED, "code": "387542000"}]},
            "subject": SUBJECT,
            "context": CONTEXT,
            "effectiveDateTime": "2026-03-01T09:30:00+01:00",
            "dosage": {"dose": {"value": 120, "unit": "mg"}},
        },
    ]


def _make_app(tmp_path: Path, **settings: Any) -> tuple[Flask, ResourceStore]:
    url = f"sqlite:///{tmp_path / 'fhir.db'}"
    store = ResourceStore.from_url(url)
    store.create_schema()
    app = Flask(__name__)
    app.extensions["fhirbridge"] = Services(
        settings=Settings(database_url=url, **settings),
        pack=None,  # type: ignore[arg-type]
        input_validator=None,  # type: ignore[arg-type]
        output_validator=None,  # type: ignore[arg-type]
        store=store,
        outbox=None,  # type: ignore[arg-type]
    )
    problems.init_app(app)
    fhir.init_app(app)
    return app, store


def _submit(store: ResourceStore, resources: list[dict[str, Any]], now: datetime) -> None:
    store.save_submission(
        submission_id=str(uuid.uuid4()),
        source="test",
        patient_id=PATIENT,
        content_hash=uuid.uuid4().hex,
        resources=resources,
        summary={},
        now=now,
    )


@pytest.fixture
def store_app(tmp_path: Path) -> Iterator[tuple[Flask, ResourceStore]]:
    app, store = _make_app(tmp_path, page_size=2, max_page_size=3)
    _submit(store, _seed(), T0)
    _submit(store, [_heart_rate(71)], T1)  # heart rate version 2
    try:
        yield app, store
    finally:
        store.close()


@pytest.fixture
def client(store_app: tuple[Flask, ResourceStore]) -> FlaskClient:
    return store_app[0].test_client()


def _json(response: TestResponse) -> Any:
    assert response.content_type == FHIR_JSON
    return orjson.loads(response.data)


def _outcome(response: TestResponse, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.data
    body = _json(response)
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"]
    return body  # type: ignore[no-any-return]


def _ids(bundle: dict[str, Any]) -> set[str]:
    return {e["resource"]["id"] for e in bundle.get("entry", [])}


def _link(bundle: dict[str, Any], relation: str) -> str | None:
    return next((x["url"] for x in bundle["link"] if x["relation"] == relation), None)


# --------------------------------------------------------------------------- metadata


def test_capability_statement(client: FlaskClient) -> None:
    response = client.get("/fhir/metadata")
    assert response.status_code == 200
    cs = _json(response)
    assert cs["resourceType"] == "CapabilityStatement"
    assert (cs["status"], cs["kind"], cs["fhirVersion"]) == ("active", "instance", "4.0.1")
    assert cs["software"]["name"] == "fhirbridge" and cs["software"]["version"]
    assert "json" in cs["format"] and cs["date"]
    assert cs["implementation"]["url"] == "http://localhost/fhir"
    resources = cs["rest"][0]["resource"]
    assert [r["type"] for r in resources] == list(SUPPORTED_TYPES)
    for entry in resources:
        assert [i["code"] for i in entry["interaction"]] == [
            "read",
            "vread",
            "history-instance",
            "search-type",
        ]
        names = [p["name"] for p in entry["searchParam"]]
        assert names == ["_id", "_lastUpdated", *(p.name for p in PARAMS[entry["type"]])]
        for param in entry["searchParam"]:
            assert param["type"] in ("token", "reference", "date")
            if "definition" in param:
                assert param["definition"].startswith("http://hl7.org/fhir/SearchParameter/")
        operations = entry.get("operation", [])
        assert operations == (
            [
                {
                    "name": "everything",
                    "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything",
                }
            ]
            if entry["type"] == "Patient"
            else []
        )


def _sample_value(param: dict[str, Any], rtype: str) -> str:
    if param["type"] == "date":
        return "ge2026-01-01"
    if param["type"] == "token":
        return "urn:x|y"
    target = {"encounter": "Encounter", "context": "Encounter"}.get(param["name"], "Patient")
    return f"{target}/{PATIENT}"


def test_every_advertised_parameter_is_accepted_in_strict_mode(client: FlaskClient) -> None:
    cs = _json(client.get("/fhir/metadata"))
    strict = {"Prefer": "handling=strict"}
    for entry in cs["rest"][0]["resource"]:
        rtype = entry["type"]
        for param in entry["searchParam"]:
            value = _sample_value(param, rtype)
            response = client.get(
                f"/fhir/{rtype}", query_string={param["name"]: value}, headers=strict
            )
            assert response.status_code == 200, (rtype, param["name"], response.data)
            assert _json(response)["type"] == "searchset"
        # and one that is not advertised is refused
        _outcome(client.get(f"/fhir/{rtype}?name=x", headers=strict), 400)


def test_advertised_parameters_find_the_seed(client: FlaskClient) -> None:
    cases = {
        ("Observation", "patient", PATIENT): {HEART_RATE, BLOOD_PRESSURE},
        ("Observation", "subject", f"Patient/{PATIENT}"): {HEART_RATE, BLOOD_PRESSURE},
        ("Observation", "encounter", ENCOUNTER): {HEART_RATE, BLOOD_PRESSURE},
        ("Observation", "code", f"{LOINC}|8867-4"): {HEART_RATE},
        ("Observation", "category", "vital-signs"): {HEART_RATE, BLOOD_PRESSURE},
        ("Observation", "date", "2026-03-01T09:30:00Z"): {HEART_RATE},
        ("Observation", "date", "gt2026-03-01T09:30:00Z"): {BLOOD_PRESSURE},
        ("Observation", "_lastUpdated", "ge2026-03-02"): {HEART_RATE},
        ("Encounter", "date", "2026-03-01"): {ENCOUNTER},
        ("Encounter", "patient", PATIENT): {ENCOUNTER},
        ("AdverseEvent", "event", "422587007"): {ADVERSE_EVENT},
        ("AdverseEvent", "date", "2026-03"): {ADVERSE_EVENT},
        ("MedicationAdministration", "effective-time", "le2026-03-01"): {ADMINISTRATION},
        ("MedicationAdministration", "context", f"Encounter/{ENCOUNTER}"): {ADMINISTRATION},
        ("MedicationAdministration", "code", "387542000"): {ADMINISTRATION},
        ("Patient", "identifier", "urn:oid:1.2.3.4|MRN-77"): {PATIENT},
        ("Patient", "_id", PATIENT): {PATIENT},
    }
    for (rtype, name, value), expected in cases.items():
        bundle = _json(client.get(f"/fhir/{rtype}", query_string={name: value}))
        assert _ids(bundle) == expected, (rtype, name, value)
        assert bundle["total"] == len(expected)


# --------------------------------------------------------------------------- read / vread / history


def test_read(client: FlaskClient, store_app: tuple[Flask, ResourceStore]) -> None:
    response = client.get(f"/fhir/Observation/{HEART_RATE}")
    assert response.status_code == 200
    assert response.headers["ETag"] == 'W/"2"'
    assert response.headers["Last-Modified"] == "Mon, 02 Mar 2026 12:00:00 GMT"
    assert response.headers["Content-Location"].endswith(f"/Observation/{HEART_RATE}/_history/2")
    body = _json(response)
    assert body["valueQuantity"]["value"] == 71
    assert body["meta"] == {"versionId": "2", "lastUpdated": "2026-03-02T12:00:00.000+00:00"}
    # the stored bytes, as stored
    assert (
        response.data == (store_app[1].read_stored("Observation", HEART_RATE).json or "").encode()
    )
    patient = _json(client.get(f"/fhir/Patient/{PATIENT}"))
    assert patient["meta"]["security"] == [{"system": "http://x.org/conf", "code": "R"}]


def test_conditional_read(client: FlaskClient) -> None:
    url = f"/fhir/Observation/{HEART_RATE}"
    not_modified = client.get(url, headers={"If-None-Match": 'W/"2"'})
    assert not_modified.status_code == 304
    assert not_modified.data == b""
    assert not_modified.headers["ETag"] == 'W/"2"'
    assert client.get(url, headers={"If-None-Match": '"2"'}).status_code == 304
    assert client.get(url, headers={"If-None-Match": 'W/"1"'}).status_code == 200
    later = "Tue, 03 Mar 2026 00:00:00 GMT"
    assert client.get(url, headers={"If-Modified-Since": later}).status_code == 304
    earlier = "Sun, 01 Mar 2026 00:00:00 GMT"
    assert client.get(url, headers={"If-Modified-Since": earlier}).status_code == 200
    assert client.head(url).status_code == 200


def test_read_errors(client: FlaskClient, store_app: tuple[Flask, ResourceStore]) -> None:
    _outcome(client.get(f"/fhir/Observation/{uuid.uuid4()}"), 404)
    _outcome(client.get(f"/fhir/Patient/{HEART_RATE}"), 404)
    _outcome(client.get("/fhir/Patient/not_a_valid_id!"), 404)
    _outcome(client.get("/fhir/Patient/" + "a" * 65), 404)
    unsupported = _outcome(client.get(f"/fhir/Basic/{PATIENT}"), 404)
    assert unsupported["issue"][0]["code"] == "not-supported"
    _outcome(client.get("/fhir/NotAType"), 404)
    _outcome(client.post(f"/fhir/Patient/{PATIENT}"), 405)
    _outcome(client.get("/fhir/Patient/a/b/c/d"), 404)
    store_app[1].delete("AdverseEvent", ADVERSE_EVENT, now=T1)
    gone = _outcome(client.get(f"/fhir/AdverseEvent/{ADVERSE_EVENT}"), 410)
    assert gone["issue"][0]["code"] == "deleted"


def test_vread(client: FlaskClient) -> None:
    first = client.get(f"/fhir/Observation/{HEART_RATE}/_history/1")
    assert first.status_code == 200
    assert first.headers["ETag"] == 'W/"1"'
    assert _json(first)["valueQuantity"]["value"] == 64
    assert (
        _json(client.get(f"/fhir/Observation/{HEART_RATE}/_history/2"))["meta"]["versionId"] == "2"
    )
    for vid in ("3", "0", "abc", "1" * 30):
        _outcome(client.get(f"/fhir/Observation/{HEART_RATE}/_history/{vid}"), 404)


def test_history(client: FlaskClient, store_app: tuple[Flask, ResourceStore]) -> None:
    bundle = _json(client.get(f"/fhir/Observation/{HEART_RATE}/_history"))
    assert (bundle["resourceType"], bundle["type"], bundle["total"]) == ("Bundle", "history", 2)
    assert [e["resource"]["meta"]["versionId"] for e in bundle["entry"]] == ["2", "1"]
    assert [e["request"] for e in bundle["entry"]] == [
        {"method": "PUT", "url": f"Observation/{HEART_RATE}"}
    ] * 2
    assert [e["response"]["status"] for e in bundle["entry"]] == ["200 OK", "201 Created"]
    assert bundle["entry"][0]["response"]["etag"] == 'W/"2"'
    assert bundle["entry"][0]["fullUrl"] == f"http://localhost/fhir/Observation/{HEART_RATE}"
    _outcome(client.get(f"/fhir/Observation/{uuid.uuid4()}/_history"), 404)

    store_app[1].delete("Observation", HEART_RATE, now=T1)
    after = _json(client.get(f"/fhir/Observation/{HEART_RATE}/_history"))
    assert after["entry"][0]["request"]["method"] == "DELETE"
    assert "resource" not in after["entry"][0]
    _outcome(client.get(f"/fhir/Observation/{HEART_RATE}/_history/3"), 410)


# --------------------------------------------------------------------------- search


def test_search_bundle(client: FlaskClient) -> None:
    response = client.get(f"/fhir/Observation?patient={PATIENT}&_count=3&unknown=1")
    assert response.status_code == 200
    bundle = _json(response)
    assert (bundle["type"], bundle["total"]) == ("searchset", 2)
    assert _ids(bundle) == {HEART_RATE, BLOOD_PRESSURE}
    for entry in bundle["entry"]:
        assert entry["fullUrl"] == f"http://localhost/fhir/Observation/{entry['resource']['id']}"
        assert entry["search"] == {"mode": "match"}
    self_link = _link(bundle, "self")
    assert self_link is not None
    assert self_link.startswith("http://localhost/fhir/Observation?")
    assert parse_qsl(urlsplit(self_link).query) == [("patient", PATIENT), ("_count", "3")]
    empty = _json(client.get("/fhir/Observation?code=nothing"))
    assert empty["total"] == 0 and "entry" not in empty


def test_paging_follows_next_until_done(client: FlaskClient) -> None:
    for count in ("1", "2", None):
        query = "/fhir/Observation?category=vital-signs&_sort=-date"
        url: str | None = query + (f"&_count={count}" if count else "")
        seen: list[str] = []
        pages = 0
        while url:
            bundle = _json(client.get(url))
            assert bundle["total"] == 2
            seen.extend(e["resource"]["id"] for e in bundle.get("entry", []))
            assert _link(bundle, "first") is not None
            if pages:
                assert _link(bundle, "previous") is not None
            url = _link(bundle, "next")
            assert url is None or url.startswith("http://localhost/fhir/Observation?")
            pages += 1
        assert seen == [BLOOD_PRESSURE, HEART_RATE]  # each once, in order
    # page_size (2) is the default and max_page_size (3) the ceiling
    every = _json(client.get("/fhir/Patient?_count=100"))
    assert parse_qsl(urlsplit(_link(every, "self") or "").query) == [("_count", "3")]
    total_only = _json(client.get("/fhir/Observation?_count=0"))
    assert total_only["total"] == 2 and "entry" not in total_only


def test_configured_base_url(tmp_path: Path) -> None:
    app, store = _make_app(tmp_path, base_url="https://ehr.example.org/fhir/")
    try:
        _submit(store, [_patient()], T0)
        bundle = _json(app.test_client().get("/fhir/Patient"))
        assert bundle["entry"][0]["fullUrl"] == f"https://ehr.example.org/fhir/Patient/{PATIENT}"
        assert (_link(bundle, "self") or "").startswith("https://ehr.example.org/fhir/Patient?")
    finally:
        store.close()


def test_post_search(client: FlaskClient) -> None:
    response = client.post(
        "/fhir/Observation/_search?category=vital-signs",
        data={"code": "8867-4", "_count": "5"},
    )
    assert response.status_code == 200
    assert _ids(_json(response)) == {HEART_RATE}
    _outcome(
        client.post("/fhir/Observation/_search", json={"code": "8867-4"}),
        415,
    )
    _outcome(client.post("/fhir/Nope/_search", data={"code": "x"}), 404)


def test_strict_handling(client: FlaskClient) -> None:
    lenient = client.get("/fhir/Observation?foo=bar&code=8867-4")
    assert lenient.status_code == 200
    assert _ids(_json(lenient)) == {HEART_RATE}
    strict = _outcome(
        client.get(
            "/fhir/Observation?foo=bar&code=8867-4",
            headers={"Prefer": "return=minimal, handling=strict"},
        ),
        400,
    )
    assert "foo" in strict["issue"][0]["diagnostics"]
    explicit = client.get("/fhir/Observation?foo=bar", headers={"Prefer": "handling=lenient"})
    assert explicit.status_code == 200


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("date=1975-13-45", "date"),
        ("date=xx1975-01-02", "date"),
        ("_count=MRN-77", "_count"),
        ("_offset=-1", "_offset"),
        ("subject=Patient%2FMRN 77", "subject"),
        ("identifier=a|b|MRN-77", "identifier"),
        ("code:text=MRN-77", "code"),
    ],
)
def test_malformed_values_name_the_parameter_not_the_value(
    client: FlaskClient, query: str, param: str
) -> None:
    outcome = _outcome(client.get(f"/fhir/Observation?{query}"), 400)
    text = orjson.dumps(outcome).decode()
    assert f"'{param}'" in text
    assert "MRN-77" not in text and "1975" not in text


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize(
    ("query", "accept", "status"),
    [
        ("", None, 200),
        ("", "*/*", 200),
        ("", "application/fhir+json", 200),
        ("", "application/fhir+json; fhirVersion=4.0", 200),
        ("", "application/json", 200),
        ("", "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", 200),
        ("", "application/fhir+xml", 406),
        ("", "application/xml, text/xml", 406),
        ("", "application/fhir+json;q=0", 406),
        ("_format=json", None, 200),
        ("_format=application/fhir+json", None, 200),  # "+" decoded as a space
        ("_format=application%2Ffhir%2Bjson", None, 200),
        ("_format=application/json", "application/fhir+xml", 200),  # _format wins
        ("_format=xml", None, 406),
        ("_format=application/fhir%2Bxml", "application/fhir+json", 406),
        ("_format=html", None, 406),
    ],
)
def test_format_negotiation(
    client: FlaskClient, query: str, accept: str | None, status: int
) -> None:
    headers = {"Accept": accept} if accept else {}
    for path in ("/fhir/metadata", f"/fhir/Patient/{PATIENT}", "/fhir/Patient"):
        response = client.get(f"{path}?{query}", headers=headers)
        assert response.status_code == status, (path, query, accept)
        assert response.content_type == FHIR_JSON
        if status == 406:
            _outcome(response, 406)


def test_pretty(client: FlaskClient) -> None:
    compact = client.get(f"/fhir/Patient/{PATIENT}")
    pretty = client.get(f"/fhir/Patient/{PATIENT}?_pretty=true")
    assert b"\n  " in pretty.data and b"\n" not in compact.data
    assert orjson.loads(pretty.data) == orjson.loads(compact.data)


# --------------------------------------------------------------------------- $everything


def test_everything(client: FlaskClient) -> None:
    response = client.get(f"/fhir/Patient/{PATIENT}/$everything")
    assert response.status_code == 200
    bundle = _json(response)
    assert bundle["type"] == "searchset"
    assert bundle["total"] == 6
    assert bundle["entry"][0]["resource"]["resourceType"] == "Patient"
    assert _ids(bundle) == {
        PATIENT,
        ENCOUNTER,
        HEART_RATE,
        BLOOD_PRESSURE,
        ADVERSE_EVENT,
        ADMINISTRATION,
    }
    assert all(e["search"]["mode"] == "match" for e in bundle["entry"])
    assert all(e["fullUrl"].startswith("http://localhost/fhir/") for e in bundle["entry"])
    assert _json(client.get(f"/fhir/Patient/{PATIENT}/%24everything"))["total"] == 6

    only = _json(client.get(f"/fhir/Patient/{PATIENT}/$everything?_type=Observation"))
    assert _ids(only) == {HEART_RATE, BLOOD_PRESSURE}
    since = _json(client.get(f"/fhir/Patient/{PATIENT}/$everything?_since=2026-03-02T00:00:00Z"))
    assert _ids(since) == {HEART_RATE}
    assert (_link(since, "self") or "").endswith("$everything?_since=2026-03-02T00%3A00%3A00Z")

    _outcome(client.get(f"/fhir/Patient/{uuid.uuid4()}/$everything"), 404)
    _outcome(client.get(f"/fhir/Patient/{PATIENT}/$everything?_type=Basic"), 400)
    _outcome(client.get(f"/fhir/Patient/{PATIENT}/$everything?_since=yesterday"), 400)
    assert client.get(f"/fhir/Patient/{PATIENT}/$everything?x=1").status_code == 200
    _outcome(
        client.get(
            f"/fhir/Patient/{PATIENT}/$everything?x=1", headers={"Prefer": "handling=strict"}
        ),
        400,
    )
    _outcome(client.get(f"/fhir/Observation/{HEART_RATE}/$everything"), 404)


# --------------------------------------------------------------------------- robustness

_NASTY = [
    "_count=99999999999999999999",
    "_offset=99999999",
    "_count=%F0%9F%92%A5",
    "date=ge",
    "date=",
    "date=%00",
    "code=%00",
    "%00=1",
    "patient=%00",
    "_sort=-",
    "_sort=,,,",
    "_sort=-date,_id,-_lastUpdated",
    "code=%5C",
    "identifier=|||",
    "identifier=%7C",
    "subject:=x",
    "subject:Patient=",
    "subject:patient=x",
    ":=x",
    "=x",
    "&&&",
    "_id=" + "a" * 5000,
    "code=" + "b" * 5000,
    "date=2026-03-01T10:00:00.1234567891234Z",
    "date=9999-12-31T23:59:59-14:00",
    "date=0001-01-01T00:00:00%2B14:00",
    "code=%C3%A9%E2%80%8F",
    "%FF%FE=%FF",
    "patient=http://x/Patient/1/_history/1/extra",
    "patient=" + "Patient/" * 400 + "1",
    "_id=a,,b",
    "date=ne2026,,2027",
    "encounter:Encounter=a.b-c",
    "_lastUpdated=lt0001",
    "_format=",
    "_pretty=maybe",
    "_count=0&_offset=5",
]


@pytest.mark.parametrize("query", _NASTY)
def test_no_query_string_causes_a_server_error(client: FlaskClient, query: str) -> None:
    for path in ("/fhir/Observation", "/fhir/Patient", f"/fhir/Patient/{PATIENT}/$everything"):
        response = client.get(f"{path}?{query}")
        assert response.status_code < 500, (path, query, response.data)
        assert response.content_type == FHIR_JSON
        strict = client.get(f"{path}?{query}", headers={"Prefer": "handling=strict"})
        assert strict.status_code < 500, (path, query, strict.data)
    post = client.post(
        "/fhir/Observation/_search",
        data=query,
        content_type="application/x-www-form-urlencoded",
    )
    assert post.status_code < 500, (query, post.data)


@pytest.mark.parametrize(
    "path",
    [
        "/fhir/Patient/%00",
        "/fhir/Patient/%00/_history",
        "/fhir/Patient/x/_history/%00",
        "/fhir/%00",
        "/fhir/%00/x",
        "/fhir/Patient/" + "a" * 3000,
        "/fhir/Patient/..%2F..%2Fetc",
        "/fhir/Patient/%F0%9F%92%A5/$everything",
    ],
)
def test_no_path_causes_a_server_error(client: FlaskClient, path: str) -> None:
    response = client.get(path)
    assert 400 <= response.status_code < 500
    _outcome(response, response.status_code)
