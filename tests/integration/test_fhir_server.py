"""What the sync engine may rely on: sekmet-fhir 0.1.1's observed behaviour, pinned.

Settings: ``simulator.enabled: false``, ``validation.inbound: strict`` (fhir.resources R4B models),
no auth. Every request below is JSON (``application/fhir+json``). Each answer, errors included,
has ``Content-Type: application/fhir+json; charset=utf-8``; every error body is an
OperationOutcome.

==========================================================  =======================================
behaviour                                                   observed
==========================================================  =======================================
PUT Type/<client uuid>, new (update-as-create)              201, ETag W/"1", Location
                                                            <base>/Type/<id>/_history/1, body =
                                                            resource with meta.versionId "1"
same PUT again (identical body)                             200, ETag W/"2": EVERY PUT makes a new
                                                            version, even with no change
PUT with ``Prefer: return=minimal``                         200/201, empty body, ETag + Location
PUT with If-Match of a stale version                        **412** (OperationOutcome code
                                                            ``conflict``), never 409
PUT with If-Match on a resource that does not exist         412
PUT with If-Match of the current version (W/"n" or "n")     200
PUT without ``id`` in the body                              400 (``required``)
id not ``[A-Za-z0-9\\-.]{1,64}`` (e.g. ``a_b``, 65 chars)     400
DELETE Type/id                                              200 + OperationOutcome (not 204);
                                                            then GET -> 410; a later PUT -> 201
                                                            with versionId n+2 (delete = 1 version)
POST + If-None-Exist identifier=sys|val (Patient, Obs.)     201 first, then 200 with the existing
                                                            resource (same id); nothing created
POST + If-None-Exist, criteria match 2 resources            412 (``multiple-matches``)
POST AdverseEvent + If-None-Exist: identifier=...           **400** "Unknown search parameter
                                                            'identifier' for AdverseEvent";
                                                            nothing created
GET Type?identifier=sys|val  (Patient, Practitioner,        200 searchset, exact matches; also
Encounter, EpisodeOfCare, Observation, Medication,          ``identifier=val`` (any system)
MedicationAdministration, Procedure)
GET AdverseEvent?identifier=sys|val                         **200 with EVERY AdverseEvent**: the
                                                            unknown parameter is ignored; a
                                                            search.mode=outcome entry carries a
                                                            warning OperationOutcome. Never use it
                                                            to check existence!
same with ``Prefer: handling=strict``                       400 (``not-supported``)
GET Patient?bogus=1 (any unknown parameter)                 200, parameter ignored (all Patients)
GET AdverseEvent?_id=<id>, GET AdverseEvent/<id>            work (read-by-id is the safe probe)
transaction, POST entries with urn:uuid fullUrls that       200 transaction-response; entry i
reference each other (+ ifNoneExist)                        answers request i: response.status
                                                            "201 Created", location
                                                            <base>/T/<new id>/_history/1, etag,
                                                            lastModified, resource; urn:uuid refs
                                                            rewritten to "T/<new id>";
                                                            ifNoneExist match -> "200 OK"
transaction, fhirbridge shape (fullUrl urn:uuid:<id>,       200; every entry "201 Created", resent:
PUT T/<id>, references "T/<id>")                            "200 OK"; references kept verbatim;
                                                            entry order irrelevant
transaction with one invalid entry / stale ifMatch          400 / 412 for the whole Bundle,
                                                            OperationOutcome "Transaction rolled
                                                            back: ..."; NOTHING written
batch with one invalid entry                                200 batch-response; that entry:
                                                            response.status "400 Bad Request" and
                                                            the OperationOutcome in
                                                            **response.outcome** (no resource);
                                                            the other entries are written
reference to a resource that does not exist                 accepted (201): no referential checks
mappings/fixtures/medicine-session.out.json (27 PUTs,       transaction 200, all 201; resent: 200
10 resource types incl. AdverseEvent and Provenance)
GET /metadata                                               CapabilityStatement fhirVersion 4.0.1;
                                                            rest.interaction transaction, batch,
                                                            history-system; per type: updateCreate
                                                            true, conditionalCreate true,
                                                            conditionalUpdate true,
                                                            conditionalDelete "single", versioning
                                                            "versioned-update", interactions read
                                                            vread update patch delete
                                                            history-instance history-type create
                                                            search-type
CapabilityStatement resource list                           53 types; **AdverseEvent and
                                                            QuestionnaireResponse are NOT listed**
                                                            although the server stores, reads and
                                                            PUTs them (an ``auto`` profile must not
                                                            treat "not listed" as "unsupported")
strict validation rejects (400, OperationOutcome with       missing required element (Observation
``issue.code`` "structure" and ``expression``)              .status), unknown element, malformed
                                                            dateTime, wrong JSON type; also 400:
                                                            body type != URL type, non-JSON body,
                                                            Bundle.type not batch/transaction
strict validation does NOT check code values                Observation.status "bogus" -> **201**
==========================================================  =======================================

Restart (see test_restart_keeps_data_and_port): SIGTERM stop takes ~0.2 s, start ~0.7 s; data
survive both a stop and a SIGKILL; the port stays the same.
"""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.integration.fhir_server import FhirServer

pytestmark = pytest.mark.integration

GOLDEN = Path(__file__).resolve().parents[2] / "mappings" / "fixtures" / "medicine-session.out.json"
SYS = "urn:fhirbridge:test:ident"


def uid() -> str:
    return str(uuid.uuid4())


def ident(value: str) -> list[dict[str, str]]:
    return [{"system": SYS, "value": value}]


def oo_diagnostics(r: requests.Response) -> str:
    body = r.json()
    assert body["resourceType"] == "OperationOutcome", body
    assert r.headers["Content-Type"] == "application/fhir+json; charset=utf-8"
    return " | ".join(i.get("diagnostics", "") for i in body["issue"])


def make(
    rtype: str, rid: str | None = None, value: str | None = None, **extra: Any
) -> dict[str, Any]:
    """Minimal valid R4 resources of the types fhirbridge produces."""
    patient_ref = {"reference": f"Patient/{extra.pop('patient', uid())}"}
    base: dict[str, dict[str, Any]] = {
        "Patient": {"gender": "female", "birthDate": "1984-07-19"},
        "Practitioner": {"active": True, "name": [{"family": "Lindqvist"}]},
        "Encounter": {
            "status": "finished",
            "class": {
                "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                "code": "AMB",
            },
            "subject": patient_ref,
        },
        "EpisodeOfCare": {"status": "active", "patient": patient_ref},
        "Medication": {"code": {"text": "midomafetamine"}},
        "Observation": {
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
            "subject": patient_ref,
            "valueQuantity": {"value": 72, "unit": "/min"},
        },
        "MedicationAdministration": {
            "status": "completed",
            "medicationCodeableConcept": {"text": "midomafetamine 120 mg"},
            "subject": patient_ref,
            "effectiveDateTime": "2026-03-09T10:00:00Z",
        },
        "Procedure": {"status": "completed", "subject": patient_ref},
    }
    res: dict[str, Any] = {"resourceType": rtype, **copy.deepcopy(base.get(rtype, {}))}
    if rtype == "AdverseEvent":  # identifier is 0..1 on AdverseEvent
        res.update(actuality="actual", subject=patient_ref)
        if value is not None:
            res["identifier"] = ident(value)[0]
    elif value is not None:
        res["identifier"] = ident(value)
    if rid is not None:
        res["id"] = rid
    res.update(extra)
    return res


def entries_status(r: requests.Response) -> list[str]:
    return [e["response"]["status"] for e in r.json()["entry"]]


# ---------------------------------------------------------------- update-as-create, If-Match


def test_put_update_as_create_with_client_uuid(shared_fhir_server: FhirServer):
    s, rid = shared_fhir_server, uid()
    first = s.request("PUT", f"Patient/{rid}", json=make("Patient", rid, "put-1"))
    assert first.status_code == 201
    assert first.headers["ETag"] == 'W/"1"'
    assert first.headers["Location"] == f"{s.base_url}/Patient/{rid}/_history/1"
    assert first.headers["Content-Type"] == "application/fhir+json; charset=utf-8"
    assert first.json()["meta"]["versionId"] == "1"
    assert first.json()["id"] == rid

    again = s.request("PUT", f"Patient/{rid}", json=make("Patient", rid, "put-1"))
    assert again.status_code == 200
    assert again.headers["ETag"] == 'W/"2"'  # a new version even though nothing changed
    assert again.json()["meta"]["versionId"] == "2"

    read = s.read("Patient", rid)
    assert read.status_code == 200 and read.headers["ETag"] == 'W/"2"'

    minimal = s.request(
        "PUT", f"Patient/{rid}", json=make("Patient", rid), headers={"Prefer": "return=minimal"}
    )
    assert minimal.status_code == 200 and minimal.content == b""
    assert minimal.headers["ETag"] == 'W/"3"'
    assert minimal.headers["Location"].endswith(f"/Patient/{rid}/_history/3")


def test_put_if_match(shared_fhir_server: FhirServer):
    s, rid = shared_fhir_server, uid()
    body = make("Patient", rid)
    absent = s.request("PUT", f"Patient/{rid}", json=body, headers={"If-Match": 'W/"1"'})
    assert absent.status_code == 412
    assert s.request("PUT", f"Patient/{rid}", json=body).status_code == 201
    assert s.request("PUT", f"Patient/{rid}", json=body).status_code == 200  # now version 2

    stale = s.request("PUT", f"Patient/{rid}", json=body, headers={"If-Match": 'W/"1"'})
    assert stale.status_code == 412
    assert stale.json()["issue"][0]["code"] == "conflict"
    assert "Version conflict" in oo_diagnostics(stale)

    current = s.request("PUT", f"Patient/{rid}", json=body, headers={"If-Match": 'W/"2"'})
    assert current.status_code == 200 and current.headers["ETag"] == 'W/"3"'
    strong = s.request("PUT", f"Patient/{rid}", json=body, headers={"If-Match": '"3"'})
    assert strong.status_code == 200 and strong.headers["ETag"] == 'W/"4"'


def test_put_errors_and_delete_then_recreate(shared_fhir_server: FhirServer):
    s, rid = shared_fhir_server, uid()
    no_id = s.request("PUT", f"Patient/{rid}", json=make("Patient"))
    assert no_id.status_code == 400 and "id is required" in oo_diagnostics(no_id)
    mismatch = s.request("PUT", f"Patient/{rid}", json=make("Patient", uid()))
    assert mismatch.status_code == 400 and "does not match" in oo_diagnostics(mismatch)
    bad_char = s.request("PUT", "Patient/a_b", json=make("Patient", "a_b"))
    assert bad_char.status_code == 400
    too_long = s.request("PUT", f"Patient/{'x' * 65}", json=make("Patient", "x" * 65))
    assert too_long.status_code == 400

    assert s.request("PUT", f"Patient/{rid}", json=make("Patient", rid)).status_code == 201
    deleted = s.request("DELETE", f"Patient/{rid}")
    assert deleted.status_code == 200 and deleted.json()["resourceType"] == "OperationOutcome"
    assert s.read("Patient", rid).status_code == 410
    again = s.request("PUT", f"Patient/{rid}", json=make("Patient", rid))
    assert again.status_code == 201 and again.headers["ETag"] == 'W/"3"'


# ---------------------------------------------------------------- conditional create


@pytest.mark.parametrize("rtype", ["Patient", "Observation"])
def test_conditional_create_if_none_exist(shared_fhir_server: FhirServer, rtype: str):
    s, value = shared_fhir_server, uid()
    h = {"If-None-Exist": f"identifier={SYS}|{value}"}
    first = s.request("POST", rtype, json=make(rtype, value=value), headers=h)
    assert first.status_code == 201
    assert first.headers["Location"].startswith(f"{s.base_url}/{rtype}/")
    second = s.request("POST", rtype, json=make(rtype, value=value), headers=h)
    assert second.status_code == 200
    assert second.json()["id"] == first.json()["id"]
    assert second.headers["ETag"] == 'W/"1"'
    assert len(s.search(rtype, identifier=f"{SYS}|{value}")) == 1

    # a second copy without the condition -> the criteria now match 2 -> 412
    assert s.request("POST", rtype, json=make(rtype, value=value)).status_code == 201
    multiple = s.request("POST", rtype, json=make(rtype, value=value), headers=h)
    assert multiple.status_code == 412 and multiple.json()["issue"][0]["code"] == "multiple-matches"


def test_conditional_create_adverse_event_is_rejected(shared_fhir_server: FhirServer):
    s, value = shared_fhir_server, uid()
    r = s.request(
        "POST",
        "AdverseEvent",
        json=make("AdverseEvent", value=value),
        headers={"If-None-Exist": f"identifier={SYS}|{value}"},
    )
    assert r.status_code == 400
    assert "Unknown search parameter 'identifier' for AdverseEvent" in oo_diagnostics(r)
    assert r.json()["issue"][0]["code"] == "not-supported"
    # nothing was created (listing all AdverseEvents: identifier search does not work on them)
    assert not any(a.get("identifier", {}).get("value") == value for a in s.search("AdverseEvent"))


# ---------------------------------------------------------------- search by identifier

SEARCHABLE = [
    "Patient",
    "Practitioner",
    "Encounter",
    "EpisodeOfCare",
    "Observation",
    "Medication",
    "MedicationAdministration",
    "Procedure",
]


def test_search_by_identifier(shared_fhir_server: FhirServer):
    s = shared_fhir_server
    values = {rtype: uid() for rtype in SEARCHABLE}
    for rtype, value in values.items():
        rid = uid()
        assert s.request("PUT", f"{rtype}/{rid}", json=make(rtype, rid, value)).status_code == 201
    for rtype, value in values.items():
        hits = s.search(rtype, identifier=f"{SYS}|{value}")
        assert [h["identifier"][0]["value"] for h in hits] == [value], rtype
        assert s.search(rtype, identifier=value) == hits, rtype  # value alone, any system
        assert s.search(rtype, identifier=f"{SYS}|{uid()}") == [], rtype
        assert s.search(rtype, identifier=f"urn:other|{value}") == [], rtype


def test_search_adverse_event_by_identifier_ignores_the_parameter(shared_fhir_server: FhirServer):
    s = shared_fhir_server
    ids = [uid(), uid()]
    for i, rid in enumerate(ids):
        r = s.request("PUT", f"AdverseEvent/{rid}", json=make("AdverseEvent", rid, f"ae-{i}"))
        assert r.status_code == 201
        assert s.read("AdverseEvent", rid).status_code == 200

    r = s.request("GET", "AdverseEvent", params={"identifier": f"{SYS}|no-such-value"})
    assert r.status_code == 200
    bundle = r.json()
    matches = [e["resource"]["id"] for e in bundle["entry"] if e["search"]["mode"] == "match"]
    assert set(ids) <= set(matches)  # everything, not nothing
    assert bundle["total"] == len(matches) >= 2
    outcome = [e["resource"] for e in bundle["entry"] if e["search"]["mode"] == "outcome"]
    assert outcome[0]["issue"][0]["severity"] == "warning"
    assert "parameter ignored" in outcome[0]["issue"][0]["diagnostics"]

    strict = s.request(
        "GET",
        "AdverseEvent",
        params={"identifier": f"{SYS}|ae-0"},
        headers={"Prefer": "handling=strict"},
    )
    assert strict.status_code == 400 and strict.json()["issue"][0]["code"] == "not-supported"

    by_id = s.search("AdverseEvent", _id=ids[0])
    assert [a["id"] for a in by_id] == [ids[0]]
    assert s.search("AdverseEvent", _id=uid()) == []

    # any unknown parameter is ignored the same way, on any type
    bogus = s.request("GET", "Patient", params={"bogus": "1", "_summary": "count"})
    assert bogus.status_code == 200 and bogus.json()["total"] == s.count("Patient")


# ---------------------------------------------------------------- transaction / batch


def test_transaction_post_with_urn_uuid_references(shared_fhir_server: FhirServer):
    s, value = shared_fhir_server, uid()
    pat_url, obs_url = f"urn:uuid:{uid()}", f"urn:uuid:{uid()}"
    obs = make("Observation", value=value)
    obs["subject"] = {"reference": pat_url}
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": obs_url,
                "resource": obs,
                "request": {"method": "POST", "url": "Observation"},
            },
            {
                "fullUrl": pat_url,
                "resource": make("Patient", value=value),
                "request": {
                    "method": "POST",
                    "url": "Patient",
                    "ifNoneExist": f"identifier={SYS}|{value}",
                },
            },
        ],
    }
    r = s.request("POST", "", json=bundle)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["type"] == "transaction-response"
    obs_entry, pat_entry = out["entry"]  # same order as the request
    assert entries_status(r) == ["201 Created", "201 Created"]
    pat_id = pat_entry["resource"]["id"]
    assert pat_entry["response"]["location"] == f"{s.base_url}/Patient/{pat_id}/_history/1"
    assert pat_entry["response"]["etag"] == 'W/"1"'
    assert "lastModified" in pat_entry["response"]
    obs_id = obs_entry["resource"]["id"]
    assert obs_entry["response"]["location"] == f"{s.base_url}/Observation/{obs_id}/_history/1"
    assert obs_entry["resource"]["subject"] == {"reference": f"Patient/{pat_id}"}
    stored = s.read("Observation", obs_id).json()
    assert stored["subject"] == {"reference": f"Patient/{pat_id}"}

    # resent: the conditional Patient entry answers 200 (existing), the plain POST creates again
    again = s.request("POST", "", json=bundle)
    assert entries_status(again) == ["201 Created", "200 OK"]
    assert again.json()["entry"][0]["resource"]["subject"] == {"reference": f"Patient/{pat_id}"}
    assert len(s.search("Observation", identifier=f"{SYS}|{value}")) == 2


def fhirbridge_transaction(resources: list[dict[str, Any]]) -> dict[str, Any]:
    """The shape fhirbridge.fhir.bundle.transaction_bundle produces."""
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"urn:uuid:{r['id']}",
                "resource": r,
                "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"},
            }
            for r in resources
        ],
    }


def test_transaction_put_to_client_ids(shared_fhir_server: FhirServer):
    s = shared_fhir_server
    pid, eid = uid(), uid()
    resources = [  # referencing entries first: order does not matter
        make("Observation", uid(), uid(), patient=pid, encounter={"reference": f"Encounter/{eid}"}),
        make("Encounter", eid, uid(), patient=pid),
        make("AdverseEvent", uid(), uid(), patient=pid),
        make("Patient", pid, uid()),
    ]
    r = s.request("POST", "", json=fhirbridge_transaction(resources))
    assert r.status_code == 200, r.text
    assert entries_status(r) == ["201 Created"] * 4
    for res, entry in zip(resources, r.json()["entry"], strict=True):
        loc = f"{s.base_url}/{res['resourceType']}/{res['id']}/_history/1"
        assert entry["response"]["location"] == loc
        assert entry["response"]["etag"] == 'W/"1"'
    obs = s.read("Observation", resources[0]["id"]).json()
    assert obs["subject"] == {"reference": f"Patient/{pid}"}  # kept verbatim
    assert obs["encounter"] == {"reference": f"Encounter/{eid}"}

    again = s.request("POST", "", json=fhirbridge_transaction(resources))
    assert entries_status(again) == ["200 OK"] * 4
    assert [e["response"]["etag"] for e in again.json()["entry"]] == ['W/"2"'] * 4


def test_transaction_is_all_or_nothing(shared_fhir_server: FhirServer):
    s = shared_fhir_server
    good, bad = make("Patient", uid(), uid()), make("Observation", uid(), uid())
    del bad["status"]
    r = s.request("POST", "", json=fhirbridge_transaction([good, bad]))
    assert r.status_code == 400
    assert "Transaction rolled back" in oo_diagnostics(r)
    assert s.read("Patient", good["id"]).status_code == 404

    assert s.request("PUT", f"Patient/{good['id']}", json=good).status_code == 201
    assert s.request("PUT", f"Patient/{good['id']}", json=good).status_code == 200
    stale = fhirbridge_transaction([good, make("Patient", uid())])
    stale["entry"][0]["request"]["ifMatch"] = 'W/"1"'
    r = s.request("POST", "", json=stale)
    assert r.status_code == 412 and "rolled back" in oo_diagnostics(r)
    assert s.read("Patient", stale["entry"][1]["resource"]["id"]).status_code == 404


def test_batch_reports_per_entry_results(shared_fhir_server: FhirServer):
    s = shared_fhir_server
    ok1, ok2 = make("Patient", uid(), uid()), make("Patient", uid(), uid())
    bad = make("Observation", uid(), uid())
    del bad["status"]
    bundle = fhirbridge_transaction([ok1, bad, ok2])
    bundle["type"] = "batch"
    bundle["entry"].append({"request": {"method": "GET", "url": f"Patient/{uid()}"}})
    r = s.request("POST", "", json=bundle)
    assert r.status_code == 200
    out = r.json()
    assert out["type"] == "batch-response"
    assert entries_status(r) == ["201 Created", "400 Bad Request", "201 Created", "404 Not Found"]
    failed = out["entry"][1]
    assert "resource" not in failed  # the OperationOutcome is in response.outcome
    outcome = failed["response"]["outcome"]
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["expression"] == ["Observation.status"]
    assert s.read("Patient", ok1["id"]).status_code == 200
    assert s.read("Patient", ok2["id"]).status_code == 200
    assert s.read("Observation", bad["id"]).status_code == 404


def test_golden_fhirbridge_bundle_is_accepted(shared_fhir_server: FhirServer):
    if not GOLDEN.exists():
        pytest.skip(f"{GOLDEN} not found")
    s = shared_fhir_server
    bundle = json.loads(GOLDEN.read_text())
    r = s.request("POST", "", json=bundle)
    assert r.status_code == 200, r.text[:2000]
    n = len(bundle["entry"])
    assert entries_status(r) == ["201 Created"] * n
    again = s.request("POST", "", json=bundle)
    assert entries_status(again) == ["200 OK"] * n
    for e in bundle["entry"]:
        res = e["resource"]
        assert s.read(res["resourceType"], res["id"]).status_code == 200


def test_references_are_not_checked(shared_fhir_server: FhirServer):
    s = shared_fhir_server
    dangling = make("Observation", patient=f"never-created-{uid()[:8]}")
    assert s.request("POST", "Observation", json=dangling).status_code == 201


# ---------------------------------------------------------------- CapabilityStatement


def test_capability_statement(shared_fhir_server: FhirServer):
    r = shared_fhir_server.request("GET", "metadata")
    assert r.status_code == 200
    cs = r.json()
    assert cs["resourceType"] == "CapabilityStatement"
    assert cs["fhirVersion"] == "4.0.1"
    assert "application/fhir+json" in cs["format"]
    (rest,) = cs["rest"]
    assert rest["mode"] == "server"
    assert {i["code"] for i in rest["interaction"]} == {"transaction", "batch", "history-system"}
    by_type = {res["type"]: res for res in rest["resource"]}
    assert len(by_type) == 53
    for rtype in [*SEARCHABLE, "Provenance"]:
        res = by_type[rtype]
        assert res["updateCreate"] is True, rtype
        assert res["conditionalCreate"] is True, rtype
        assert res["conditionalUpdate"] is True, rtype
        assert res["conditionalDelete"] == "single", rtype
        assert res["versioning"] == "versioned-update", rtype
        assert {i["code"] for i in res["interaction"]} == {
            "read", "vread", "update", "patch", "delete",
            "history-instance", "history-type", "create", "search-type",
        }  # fmt: skip
        names = {p["name"] for p in res["searchParam"]}
        assert ("identifier" in names) == (rtype != "Provenance"), rtype
    # stored and served all the same, but not advertised:
    assert "AdverseEvent" not in by_type
    assert "QuestionnaireResponse" not in by_type


# ---------------------------------------------------------------- strict inbound validation

REJECTED: dict[str, tuple[dict[str, Any], str]] = {
    "missing-required": ({"status": None}, "Value for the field 'status' is required"),
    "unknown-element": ({"bogusField": 1}, "Extra inputs are not permitted"),
    "bad-datetime": ({"effectiveDateTime": "2024-13-45"}, "effectiveDateTime"),
    "wrong-json-type": ({"code": "8867-4"}, "Observation.code"),
}


@pytest.mark.parametrize("case", sorted(REJECTED))
def test_strict_validation_rejects(shared_fhir_server: FhirServer, case: str):
    change, message = REJECTED[case]
    obs = make("Observation", uid(), uid())
    obs.update(change)
    obs = {k: v for k, v in obs.items() if v is not None}
    for r in (
        shared_fhir_server.request("PUT", f"Observation/{obs['id']}", json=obs),
        shared_fhir_server.request("POST", "Observation", json=obs),
    ):
        assert r.status_code == 400
        assert message in oo_diagnostics(r)
        assert r.json()["issue"][0]["code"] == "structure"
        assert r.json()["issue"][0].get("expression")
    assert shared_fhir_server.read("Observation", obs["id"]).status_code == 404


def test_strict_validation_other_rejections_and_what_it_accepts(shared_fhir_server: FhirServer):
    s = shared_fhir_server
    wrong_type = s.request("POST", "Patient", json=make("Observation"))
    assert wrong_type.status_code == 400 and "does not match URL type" in oo_diagnostics(wrong_type)
    not_json = s.request(
        "POST", "Patient", data=b"not json", headers={"Content-Type": "application/fhir+json"}
    )
    assert not_json.status_code == 400 and "not valid JSON" in oo_diagnostics(not_json)
    collection = s.request("POST", "", json={"resourceType": "Bundle", "type": "collection"})
    assert collection.status_code == 400
    assert s.request("GET", "NotAType").status_code == 404

    # code values are NOT checked against their value sets
    bogus = s.request("POST", "Observation", json=make("Observation", status="bogus"))
    assert bogus.status_code == 201
    assert bogus.json()["status"] == "bogus"


# ---------------------------------------------------------------- the process itself


def test_restart_keeps_data_and_port(fhir_server: FhirServer):
    s = fhir_server
    assert s.running and s.base_url == f"http://127.0.0.1:{s.port}/fhir"
    assert s.count("Patient") == 0
    ids = [uid() for _ in range(3)]
    for rid in ids:
        assert s.request("PUT", f"Patient/{rid}", json=make("Patient", rid, rid)).status_code == 201
    # search() follows the next links
    assert sorted(p["id"] for p in s.search("Patient", _count="2")) == sorted(ids)
    assert len(s.search_bundles("Patient", _count="2")) == 2

    url, pid = s.base_url, s.pid
    s.stop()
    assert not s.running
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/metadata", timeout=2)
    s.start()
    assert s.base_url == url and s.pid != pid
    assert s.count("Patient") == 3
    assert s.read("Patient", ids[0]).headers["ETag"] == 'W/"1"'

    s.kill()  # a crash: committed writes survive
    assert not s.running
    s.start()
    assert s.count("Patient") == 3

    s.wipe()
    assert s.running and s.base_url == url
    assert s.count("Patient") == 0
