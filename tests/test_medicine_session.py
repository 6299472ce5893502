"""The medicine-session submission yields the resources, codes and links issue #2 asks for."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from fhirbridge.fhir.validate import OutputValidator
from fhirbridge.mapping.pack import load_pack
from fhirbridge.pipeline import transform
from fhirbridge.validation import SubmissionValidator

ROOT = Path(__file__).resolve().parents[1]
PACK = load_pack(ROOT / "mappings")
DOC = json.loads((ROOT / "mappings/fixtures/medicine-session.in.json").read_text())
NOW = datetime(2026, 11, 25, tzinfo=UTC)


@pytest.fixture(scope="module")
def out() -> list[dict[str, Any]]:
    result = transform(
        DOC,
        pack=PACK,
        input_validator=SubmissionValidator(PACK.source_schema, PACK.integrity),
        output_validator=OutputValidator(),
        now=NOW,
    )
    return result.resources


def _of(out: list[dict[str, Any]], rtype: str) -> list[dict[str, Any]]:
    return [r for r in out if r["resourceType"] == rtype]


def _codes(concept: dict[str, Any]) -> set[tuple[str, str]]:
    return {(c["system"], c["code"]) for c in concept.get("coding", [])}


def _ref(r: dict[str, Any]) -> dict[str, str]:
    return {"reference": f"{r['resourceType']}/{r['id']}"}


def test_resource_counts(out: list[dict[str, Any]]) -> None:
    assert Counter(r["resourceType"] for r in out) == {
        "Patient": 1,
        "Practitioner": 2,
        "EpisodeOfCare": 1,
        "Encounter": 1,
        "Procedure": 1,
        "Medication": 1,
        "MedicationAdministration": 2,
        "Observation": 15,  # 14 vital signs over 4 time points + 1 CAPS-5 score
        "AdverseEvent": 2,
        "Provenance": 1,
    }


def test_every_resource_passes_both_validators(out: list[dict[str, Any]]) -> None:
    validator = OutputValidator()
    assert {r["id"]: validator.validate(r) for r in out} == {r["id"]: [] for r in out}


def test_encounter_and_procedure(out: list[dict[str, Any]]) -> None:
    (enc,) = _of(out, "Encounter")
    (proc,) = _of(out, "Procedure")
    (course,) = _of(out, "EpisodeOfCare")
    assert enc["status"] == "finished"
    assert enc["class"]["code"] == "AMB"
    assert ("http://snomed.info/sct", "75516001") in set().union(*(_codes(t) for t in enc["type"]))
    assert ("urn:fhirbridge:CodeSystem:session-type", "medicine") in set().union(
        *(_codes(t) for t in enc["type"])
    )
    assert enc["episodeOfCare"] == [_ref(course)]
    assert [p["type"][0]["coding"][0]["code"] for p in enc["participant"]] == ["PPRF", "SPRF"]
    assert enc["period"] == {
        "start": "2026-03-02T09:00:00-05:00",
        "end": "2026-03-02T17:15:00-05:00",
    }
    assert _codes(proc["code"]) == {("http://snomed.info/sct", "75516001")}
    assert proc["encounter"] == _ref(enc) and len(proc["performer"]) == 2


def test_doses(out: list[dict[str, Any]]) -> None:
    (med,) = _of(out, "Medication")
    initial, supplemental = _of(out, "MedicationAdministration")
    (enc,) = _of(out, "Encounter")
    assert ("http://fdasis.nlm.nih.gov", "KE1SEN21RM") in _codes(med["code"])
    assert med["batch"] == {"lotNumber": "LOT-2026-02A"}
    for ma in (initial, supplemental):
        assert ma["context"] == _ref(enc)
        assert ma["medicationReference"] == _ref(med)
        assert _codes(ma["dosage"]["route"]) == {("http://snomed.info/sct", "26643006")}
    assert initial["dosage"]["dose"] == {
        "value": 80,
        "unit": "mg",
        "system": "http://unitsofmeasure.org",
        "code": "mg",
    }
    assert supplemental["dosage"]["dose"]["value"] == 40
    assert supplemental["supportingInformation"] == [_ref(initial)]
    assert "supportingInformation" not in initial


def test_placebo_and_blinded_drug_are_never_coded_as_mdma() -> None:
    doc = json.loads(json.dumps(DOC))
    doc["doses"][0]["substance"] = "placebo"
    doc["doses"][1]["substance"] = "blinded-study-drug"
    doc["doses"][1].update(status="not-done", notGivenReason="Blood pressure above protocol limit")
    result = transform(
        doc,
        pack=PACK,
        input_validator=SubmissionValidator(PACK.source_schema, PACK.integrity),
        output_validator=OutputValidator(),
        now=NOW,
    )
    meds = _of(result.resources, "Medication")
    assert len(meds) == 2
    for med in meds:
        assert ("http://fdasis.nlm.nih.gov", "KE1SEN21RM") not in _codes(med["code"])
        assert ("http://snomed.info/sct", "288459003") not in _codes(med["code"])
    withheld = _of(result.resources, "MedicationAdministration")[1]
    assert withheld["status"] == "not-done"
    assert withheld["statusReason"] == [{"text": "Blood pressure above protocol limit"}]


VITALS = {
    "8867-4": ("/min", [72, 96, 104, 80]),
    "8310-5": ("Cel", [36.7, 37.1, 37.4, 36.9]),
    "9279-1": ("/min", [18]),
    "2708-6": ("%", [98]),
}


def test_vital_signs_follow_the_profile(out: list[dict[str, Any]]) -> None:
    (enc,) = _of(out, "Encounter")
    (patient,) = _of(out, "Patient")
    vitals = [
        o for o in _of(out, "Observation") if o["category"][0]["coding"][0]["code"] == "vital-signs"
    ]
    assert len(vitals) == 14
    for o in vitals:
        assert o["status"] == "final"
        assert (
            o["category"][0]["coding"][0]["system"]
            == "http://terminology.hl7.org/CodeSystem/observation-category"
        )
        assert o["subject"] == _ref(patient) and o["encounter"] == _ref(enc)
        assert o["effectiveDateTime"].endswith("-05:00")
    for loinc, (unit, values) in VITALS.items():
        found = [o for o in vitals if ("http://loinc.org", loinc) in _codes(o["code"])]
        assert [o["valueQuantity"]["value"] for o in found] == values
        assert {(o["valueQuantity"]["system"], o["valueQuantity"]["code"]) for o in found} == {
            ("http://unitsofmeasure.org", unit)
        }
    (spo2,) = [o for o in vitals if ("http://loinc.org", "2708-6") in _codes(o["code"])]
    assert ("http://loinc.org", "59408-5") in _codes(spo2["code"])
    bps = [o for o in vitals if ("http://loinc.org", "85354-9") in _codes(o["code"])]
    assert len(bps) == 4
    for bp in bps:
        assert "valueQuantity" not in bp
        assert [next(iter(_codes(c["code"])))[1] for c in bp["component"]] == ["8480-6", "8462-4"]
        assert {c["valueQuantity"]["code"] for c in bp["component"]} == {"mm[Hg]"}
    timepoints = [
        o["extension"][0]["valueString"]
        for o in vitals
        if ("http://loinc.org", "8867-4") in _codes(o["code"])
    ]
    assert timepoints == ["pre-dose", "pre-supplement", "peak", "end of session"]


def test_adverse_events(out: list[dict[str, Any]]) -> None:
    nausea, tightness = _of(out, "AdverseEvent")
    initial, supplemental = _of(out, "MedicationAdministration")
    assert nausea["actuality"] == "actual"
    assert nausea["event"] == {
        "coding": [{"system": "http://snomed.info/sct", "code": "422587007", "display": "Nausea"}],
        "text": "nausea",
    }
    # muscle tightness has no verified SNOMED code: text only, never an invented code
    assert tightness["event"] == {"text": "muscle-tightness"}
    assert _codes(nausea["severity"]) == {
        ("http://terminology.hl7.org/CodeSystem/adverse-event-severity", "mild")
    }
    assert _codes(nausea["seriousness"]) == {
        ("http://terminology.hl7.org/CodeSystem/adverse-event-seriousness", "non-serious")
    }
    assert _codes(nausea["outcome"]) == {
        ("http://terminology.hl7.org/CodeSystem/adverse-event-outcome", "resolved")
    }
    assert [s["instance"] for s in tightness["suspectEntity"]] == [
        _ref(initial),
        _ref(supplemental),
    ]
    assert _codes(nausea["suspectEntity"][0]["causality"][0]["assessment"]) == {
        ("http://terminology.hl7.org/CodeSystem/adverse-event-causality-assess", "Probably-Likely")
    }
    assert nausea["recorder"]["reference"].startswith("Practitioner/")


def test_caps5_score_uses_a_local_code(out: list[dict[str, Any]]) -> None:
    (score,) = [
        o for o in _of(out, "Observation") if o["category"][0]["coding"][0]["code"] == "survey"
    ]
    assert _codes(score["code"]) == {("urn:fhirbridge:CodeSystem:instrument", "CAPS-5")}
    assert score["valueInteger"] == 41 and score["effectiveDateTime"] == "2026-02-16"


def test_provenance_targets_everything_else(out: list[dict[str, Any]]) -> None:
    (prov,) = _of(out, "Provenance")
    assert prov["target"] == [_ref(r) for r in out if r["resourceType"] != "Provenance"]
    assert prov["recorded"] == "2026-11-25T00:00:00.000+00:00"


def test_ids_are_deterministic_and_identifiers_name_source_and_kind(
    out: list[dict[str, Any]],
) -> None:
    again = transform(
        DOC,
        pack=PACK,
        input_validator=SubmissionValidator(PACK.source_schema, PACK.integrity),
        output_validator=OutputValidator(),
        now=datetime(2027, 1, 1, tzinfo=UTC),
    ).resources
    assert [r["id"] for r in again] == [r["id"] for r in out]
    for r in out:
        if r["resourceType"] == "AdverseEvent":  # identifier is 0..1 in R4
            assert r["identifier"]["system"] == "urn:fhirbridge:clinic-a:adverse-event"
        elif r["resourceType"] != "Provenance":
            assert r["identifier"][0]["system"].startswith("urn:fhirbridge:clinic-a:")
    assert len({r["id"] for r in out}) == len(out)
