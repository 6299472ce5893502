"""POST /fhir/$validate and /fhir/{type}/$validate: always 200 + OperationOutcome when checked."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from fhirbridge import create_app
from fhirbridge.api import validate
from fhirbridge.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "tests" / "data" / "r4-examples"
GOLDEN = ROOT / "mappings" / "fixtures" / "medicine-session.out.json"
SD = "http://hl7.org/fhir/StructureDefinition/"
SENTINEL = "SENTINEL-PHI-Jane-Doe-1970"
NO_ISSUES = {
    "resourceType": "OperationOutcome",
    "issue": [{"severity": "information", "code": "informational", "diagnostics": "no issues"}],
}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlaskClient]:
    db = tmp_path_factory.mktemp("validate") / "db.sqlite"
    app = create_app(
        Settings(
            database_url=f"sqlite:///{db}", mappings_dir=ROOT / "mappings", db_auto_upgrade=True
        )
    )
    if "validate" not in app.blueprints:  # until create_app registers it
        validate.init_app(app)
    with app.test_client() as test_client:
        yield test_client
    app.extensions["fhirbridge"].store.close()


def example(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((EXAMPLES / f"{name}.json").read_bytes())
    return data


def post(client: FlaskClient, path: str, body: Any, content_type: str = "application/fhir+json"):
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    return client.post(path, data=data, content_type=content_type)


def issues(response: Any) -> list[tuple[str, str, str]]:
    assert response.json["resourceType"] == "OperationOutcome"
    return [
        (i["severity"], i["code"], i.get("expression", ["-"])[0]) for i in response.json["issue"]
    ]


def parameters(resource: Any, **extra: tuple[str, str]) -> dict[str, Any]:
    params: list[dict[str, Any]] = [{"name": "resource", "resource": resource}]
    params += [{"name": name, key: value} for name, (key, value) in extra.items()]
    return {"resourceType": "Parameters", "parameter": params}


def test_valid_resource_answers_no_issues(client: FlaskClient) -> None:
    response = post(client, "/fhir/$validate", example("Observation-heart-rate"))
    assert response.status_code == 200
    assert response.mimetype == "application/fhir+json"
    assert response.json == NO_ISSUES
    typed = post(client, "/fhir/Observation/$validate", example("Observation-blood-pressure"))
    assert typed.status_code == 200 and typed.json == NO_ISSUES


def test_invalid_resource_answers_200_with_located_issues(client: FlaskClient) -> None:
    bp = example("Observation-blood-pressure")
    bp["component"][1]["valueQuantity"]["code"] = SENTINEL
    bp["status"] = SENTINEL
    response = post(client, "/fhir/$validate", bp, content_type="application/json")
    assert response.status_code == 200
    assert issues(response) == [
        ("error", "code-invalid", "Observation.component[1].valueQuantity.code"),
        ("error", "code-invalid", "Observation.status"),
    ]
    assert SENTINEL not in response.get_data(as_text=True)


def test_bundle_answers_entry_locations(client: FlaskClient) -> None:
    bundle = json.loads(GOLDEN.read_bytes())
    assert post(client, "/fhir/$validate", bundle).json == NO_ISSUES
    del bundle["entry"][5]["resource"]["status"]
    response = post(client, "/fhir/Bundle/$validate", bundle)
    assert response.status_code == 200
    assert issues(response) == [("error", "required", "Bundle.entry[5].resource.status")]


def test_type_mismatch_is_an_error_issue(client: FlaskClient) -> None:
    response = post(client, "/fhir/Observation/$validate", example("Patient-example"))
    assert response.status_code == 200
    assert issues(response) == [("error", "invalid", "Resource.resourceType")]
    assert response.json["issue"][0]["diagnostics"].startswith("must be Observation")
    # the mismatch is added to, not instead of, the resource's own issues
    patient = example("Patient-example") | {"gender": "x"}
    both = post(client, "/fhir/Observation/$validate", patient)
    assert issues(both) == [
        ("error", "invalid", "Resource.resourceType"),
        ("error", "code-invalid", "Patient.gender"),
    ]


def test_parameters_form(client: FlaskClient) -> None:
    hr = example("Observation-heart-rate")
    ok = post(client, "/fhir/Observation/$validate", parameters(hr, mode=("valueCode", "create")))
    assert ok.status_code == 200 and ok.json == NO_ISSUES
    hr["effectiveDateTime"] = "1999-07"
    bad = post(client, "/fhir/$validate", parameters(hr))
    assert issues(bad) == [("error", "invariant", "Observation.effectiveDateTime")]
    # a Parameters posted to a type checks the wrapped resource's type
    patient = post(client, "/fhir/Observation/$validate", parameters(example("Patient-example")))
    assert issues(patient) == [("error", "invalid", "Resource.resourceType")]


def test_profile_parameter(client: FlaskClient) -> None:
    temp = example("Observation-body-temperature")
    nominated = parameters(temp, profile=("valueUri", SD + "heartrate|4.0.1"))
    response = post(client, "/fhir/$validate", nominated)
    assert issues(response) == [
        ("error", "required", "Observation.code"),
        ("error", "code-invalid", "Observation.valueQuantity.code"),
    ]
    by_query = post(client, f"/fhir/$validate?profile={SD}heartrate", temp)
    assert issues(by_query) == issues(response)
    base = post(client, f"/fhir/$validate?profile={SD}Observation", temp)
    assert base.json == NO_ISSUES
    unknown = post(client, "/fhir/$validate?profile=http://example.org/StructureDefinition/x", temp)
    assert unknown.status_code == 400
    assert issues(unknown) == [("error", "not-supported", "-")]


def test_operation_errors_are_4xx(client: FlaskClient) -> None:
    hr = example("Observation-heart-rate")
    delete = post(client, "/fhir/$validate", parameters(hr, mode=("valueCode", "delete")))
    assert delete.status_code == 400 and issues(delete) == [("error", "not-supported", "-")]
    assert post(client, "/fhir/$validate?mode=sideways", hr).status_code == 400
    empty = post(client, "/fhir/$validate", {"resourceType": "Parameters", "parameter": []})
    assert empty.status_code == 400
    assert issues(empty) == [("error", "required", "Parameters.parameter")]
    assert post(client, "/fhir/not-a-type/$validate", hr).status_code == 404


def test_malformed_json_400_and_wrong_content_type_415(client: FlaskClient) -> None:
    broken = post(client, "/fhir/$validate", '{"resourceType": "Patient", "name": ' + SENTINEL)
    assert broken.status_code == 400
    assert broken.mimetype == "application/fhir+json"
    assert [i["diagnostics"] for i in broken.json["issue"]] == [
        "malformed JSON at line 1, column 37"
    ]
    assert SENTINEL not in broken.get_data(as_text=True)
    text = post(client, "/fhir/$validate", "{}", content_type="text/plain")
    assert text.status_code == 415
    assert issues(text) == [("error", "not-supported", "-")]


def test_not_an_object(client: FlaskClient) -> None:
    response = post(client, "/fhir/$validate", [1, 2])
    assert response.status_code == 200
    assert issues(response) == [("error", "structure", "-")]
