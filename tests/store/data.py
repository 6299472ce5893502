"""Hand-written FHIR R4 resources for the store tests (ids are UUIDs, as the mapper produces)."""

from __future__ import annotations

from typing import Any

PATIENT = "6f1c1c2e-0c7a-4d5e-9a51-1d2f3a4b5c01"
OTHER_PATIENT = "6f1c1c2e-0c7a-4d5e-9a51-1d2f3a4b5c02"
PRACTITIONER = "7a2b3c4d-1111-4222-8333-944455566601"
MEDICATION = "8b3c4d5e-2222-4333-8444-a55566677701"
EPISODE = "9c4d5e6f-3333-4444-8555-b66677788801"
ENCOUNTER = "ad5e6f70-4444-4555-8666-c77788899901"
HEART_RATE = "be6f7081-5555-4666-8777-d888999aaa01"
BLOOD_PRESSURE = "be6f7081-5555-4666-8777-d888999aaa02"
OTHER_OBSERVATION = "be6f7081-5555-4666-8777-d888999aaa03"
PROCEDURE = "cf708192-6666-4777-8888-e999aaabbb01"
ADMINISTRATION = "d08192a3-7777-4888-8999-faaabbbccc01"
ADMINISTRATION_REF = "d08192a3-7777-4888-8999-faaabbbccc02"
ADVERSE_EVENT = "e192a3b4-8888-4999-8aaa-0bbbcccddd01"
PROVENANCE = "f2a3b4c5-9999-4aaa-8bbb-1cccdddeee01"

MRN = "urn:oid:1.2.3.4.5"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
SECURITY = {"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}


def patient(pid: str = PATIENT, mrn: str = "MRN-0001", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": pid,
        "meta": {
            "security": [SECURITY],
            "profile": ["http://example.org/StructureDefinition/mdma-patient"],
        },
        "identifier": [
            {"system": MRN, "value": mrn},
            {"value": f"local-{mrn}"},
        ],
        "gender": "female",
        "birthDate": "1980-05-17",
        **extra,
    }


def practitioner() -> dict[str, Any]:
    return {
        "resourceType": "Practitioner",
        "id": PRACTITIONER,
        "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": "1234567893"}],
        "name": [{"family": "Therapist", "given": ["Lead"]}],
    }


def medication() -> dict[str, Any]:
    return {
        "resourceType": "Medication",
        "id": MEDICATION,
        "code": {"coding": [{"system": SNOMED, "code": "387542000", "display": "MDMA"}]},
    }


def episode() -> dict[str, Any]:
    return {
        "resourceType": "EpisodeOfCare",
        "id": EPISODE,
        "identifier": [{"system": "urn:program", "value": "EP-1"}],
        "status": "active",
        "patient": {"reference": f"Patient/{PATIENT}"},
        "period": {"start": "2026-02-01"},
    }


def encounter() -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "id": ENCOUNTER,
        "identifier": [{"system": "urn:session", "value": "S-1"}],
        "status": "finished",
        "class": {
            "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
            "code": "AMB",
        },
        "subject": {"reference": f"Patient/{PATIENT}"},
        "episodeOfCare": [{"reference": f"EpisodeOfCare/{EPISODE}"}],
        "participant": [{"individual": {"reference": f"Practitioner/{PRACTITIONER}"}}],
        # 09:00-17:00 at +02:00 = 07:00Z-15:00Z
        "period": {"start": "2026-03-01T09:00:00+02:00", "end": "2026-03-01T17:00:00+02:00"},
    }


def heart_rate(value: int = 72, effective: str = "2026-03-01T10:30:00+02:00") -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": HEART_RATE,
        "status": "final",
        "category": [{"coding": [{"system": OBS_CATEGORY, "code": "vital-signs"}]}],
        "code": {"coding": [{"system": LOINC, "code": "8867-4", "display": "Heart rate"}]},
        "subject": {"reference": f"Patient/{PATIENT}"},
        "encounter": {"reference": f"Encounter/{ENCOUNTER}"},
        "effectiveDateTime": effective,
        "performer": [{"reference": f"Practitioner/{PRACTITIONER}"}],
        "valueQuantity": {
            "value": value,
            "unit": "beats/minute",
            "system": "http://unitsofmeasure.org",
            "code": "/min",
        },
    }


def blood_pressure() -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": BLOOD_PRESSURE,
        "identifier": [{"system": "urn:obs", "value": "BP-1"}],
        "status": "final",
        "category": [{"coding": [{"system": OBS_CATEGORY, "code": "vital-signs"}]}],
        "code": {"coding": [{"system": LOINC, "code": "85354-9"}]},
        "subject": {"reference": f"Patient/{PATIENT}"},
        "encounter": {"reference": f"Encounter/{ENCOUNTER}"},
        # a period crossing midnight UTC: 2026-03-01T23:30Z .. 2026-03-02T00:30Z
        "effectivePeriod": {"start": "2026-03-01T18:30:00-05:00", "end": "2026-03-02T00:30:00Z"},
        "component": [
            {
                "code": {"coding": [{"system": LOINC, "code": "8480-6"}]},
                "valueQuantity": {"value": 120, "unit": "mmHg"},
            },
            {
                "code": {"coding": [{"system": LOINC, "code": "8462-4"}]},
                "valueQuantity": {"value": 80, "unit": "mmHg"},
            },
        ],
    }


def other_observation() -> dict[str, Any]:
    """Another patient's observation, a year earlier, survey category."""
    return {
        "resourceType": "Observation",
        "id": OTHER_OBSERVATION,
        "status": "final",
        "category": [{"coding": [{"system": OBS_CATEGORY, "code": "survey"}]}],
        "code": {"coding": [{"system": LOINC, "code": "8867-4"}]},
        "subject": {"reference": f"Patient/{OTHER_PATIENT}"},
        "effectiveDateTime": "2025-06",
        "valueInteger": 3,
    }


def procedure() -> dict[str, Any]:
    return {
        "resourceType": "Procedure",
        "id": PROCEDURE,
        "identifier": [{"system": "urn:proc", "value": "P-1"}],
        "status": "completed",
        "code": {"coding": [{"system": SNOMED, "code": "75516001", "display": "Psychotherapy"}]},
        "subject": {"reference": f"Patient/{PATIENT}"},
        "encounter": {"reference": f"Encounter/{ENCOUNTER}"},
        "performedPeriod": {
            "start": "2026-03-01T09:15:00+02:00",
            "end": "2026-03-01T16:45:00+02:00",
        },
        "performer": [{"actor": {"reference": f"Practitioner/{PRACTITIONER}"}}],
    }


def administration() -> dict[str, Any]:
    return {
        "resourceType": "MedicationAdministration",
        "id": ADMINISTRATION,
        "identifier": [{"system": "urn:dose", "value": "D-1"}],
        "status": "completed",
        "medicationCodeableConcept": {"coding": [{"system": SNOMED, "code": "387542000"}]},
        "subject": {"reference": f"Patient/{PATIENT}"},
        "context": {"reference": f"Encounter/{ENCOUNTER}"},
        "effectiveDateTime": "2026-03-01T09:30:00+02:00",
        "dosage": {"dose": {"value": 120, "unit": "mg"}},
    }


def administration_by_reference() -> dict[str, Any]:
    return {
        "resourceType": "MedicationAdministration",
        "id": ADMINISTRATION_REF,
        "status": "completed",
        "medicationReference": {"reference": f"Medication/{MEDICATION}"},
        "subject": {"reference": f"Patient/{PATIENT}"},
        "context": {"reference": f"Encounter/{ENCOUNTER}"},
        "effectivePeriod": {
            "start": "2026-03-01T11:30:00+02:00",
            "end": "2026-03-01T11:31:00+02:00",
        },
        "dosage": {"dose": {"value": 60, "unit": "mg"}},
    }


def adverse_event() -> dict[str, Any]:
    return {
        "resourceType": "AdverseEvent",
        "id": ADVERSE_EVENT,
        "identifier": {"system": "urn:ae", "value": "AE-1"},
        "actuality": "actual",
        "event": {"coding": [{"system": SNOMED, "code": "25064002", "display": "Headache"}]},
        "subject": {"reference": f"Patient/{PATIENT}"},
        "encounter": {"reference": f"Encounter/{ENCOUNTER}"},
        "date": "2026-03-01T13:00:00+02:00",
        "recorder": {"reference": f"Practitioner/{PRACTITIONER}"},
    }


def provenance() -> dict[str, Any]:
    return {
        "resourceType": "Provenance",
        "id": PROVENANCE,
        "target": [
            {"reference": f"Patient/{PATIENT}"},
            {"reference": f"Observation/{HEART_RATE}"},
        ],
        "recorded": "2026-03-02T08:00:00.250+01:00",
        "agent": [{"who": {"reference": f"Practitioner/{PRACTITIONER}"}}],
    }


def everything_for_patient() -> list[dict[str, Any]]:
    """One submission's worth: every type we produce."""
    return [
        patient(),
        practitioner(),
        medication(),
        episode(),
        encounter(),
        heart_rate(),
        blood_pressure(),
        procedure(),
        administration(),
        administration_by_reference(),
        adverse_event(),
        provenance(),
    ]
