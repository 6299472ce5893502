"""Source format v1: every kind of bad document is rejected with the path of each problem."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from fhirbridge.mapping.pack import load_pack
from fhirbridge.validation import SubmissionValidator

ROOT = Path(__file__).resolve().parents[2]
PACK = load_pack(ROOT / "mappings")
VALIDATOR = SubmissionValidator(PACK.source_schema, PACK.integrity)
GOOD: dict[str, Any] = json.loads((ROOT / "mappings/fixtures/medicine-session.in.json").read_text())


def _problems(mutate: Any) -> list[tuple[str, str]]:
    doc = copy.deepcopy(GOOD)
    mutate(doc)
    return [(i.expression[0], i.diagnostics) for i in VALIDATOR.validate(doc)]


def test_the_fixture_is_valid() -> None:
    assert VALIDATOR.validate(GOOD) == []


PROBLEMS: list[tuple[Any, tuple[str, str]]] = [
    # wrong type
    (
        lambda d: d["doses"][0].update(amountMg="80"),
        ("doses[0].amountMg", "must be of type number"),
    ),
    # unknown enum value
    (
        lambda d: d["sessions"][0].update(type="ceremony"),
        ("sessions[0].type", "must be one of: preparation, medicine, integration"),
    ),
    # naive date-time (no offset)
    (
        lambda d: d["vitals"][0].update(takenAt="2026-03-02T09:20:00"),
        (
            "vitals[0].takenAt",
            "must be a date-time with seconds and a timezone offset "
            "(e.g. 2026-03-02T09:00:00-05:00)",
        ),
    ),
    # a date that does not exist
    (
        lambda d: d["patient"].update(birthDate="1984-02-30"),
        ("patient.birthDate", "must be a date: YYYY, YYYY-MM or YYYY-MM-DD"),
    ),
    # partial dates are fine for birthDate: no problem expected → checked separately below
    # missing required property
    (lambda d: d["patient"].pop("sex"), ("patient.sex", "required property missing: sex")),
    # unknown property
    (
        lambda d: d["patient"].update(nickname="x"),
        (
            "patient",
            "unknown property (allowed: id, mrn, studySubjectId, name, birthDate, sex)",
        ),
    ),
    # end before start
    (
        lambda d: d["sessions"][0].update(end="2026-03-02T08:00:00-05:00"),
        ("sessions[0].end", "end is before start"),
    ),
    # end before start across offsets: 13:00Z is 08:00-05:00, before the 09:00-05:00 start
    (
        lambda d: d["sessions"][0].update(end="2026-03-02T13:00:00Z"),
        ("sessions[0].end", "end is before start"),
    ),
    # a dose whose session is missing
    (
        lambda d: d["doses"][1].update(sessionId="s-nope"),
        ("doses[1].sessionId", "refers to an id that is not in sessions[*].id"),
    ),
    # an adverse event whose suspect dose is missing
    (
        lambda d: d["adverseEvents"][1]["suspectDoseIds"].append("d-9"),
        ("adverseEvents[1].suspectDoseIds[2]", "refers to an id that is not in doses[*].id"),
    ),
    # a session whose therapist is missing
    (
        lambda d: d["sessions"][0]["therapists"].append("t-ghost"),
        ("sessions[0].therapists[2]", "refers to an id that is not in practitioners[*].id"),
    ),
    # duplicate ids
    (
        lambda d: d["vitals"][3].update(id="v-1"),
        ("vitals[3].id", "duplicate id (first used at vitals[0].id)"),
    ),
    # systolic without diastolic
    (
        lambda d: d["vitals"][0].pop("diastolic"),
        ("vitals[0]", "diastolic is required when systolic is present"),
    ),
    # a vital-sign record with no measurement
    (
        lambda d: d["vitals"].append(
            {"id": "v-9", "sessionId": "s-med-1", "takenAt": "2026-03-02T10:00:00-05:00"}
        ),
        (
            "vitals[4]",
            "needs at least one of: heartRate, systolic+diastolic, temperatureC, "
            "respiratoryRate, spo2",
        ),
    ),
    # a withheld dose without its reason
    (
        lambda d: d["doses"][1].update(status="not-done"),
        ("doses[1].notGivenReason", "required property missing: notGivenReason"),
    ),
    # implausible value
    (lambda d: d["vitals"][0].update(heartRate=900), ("vitals[0].heartRate", "must be <= 300")),
]


@pytest.mark.parametrize(("mutate", "expected"), PROBLEMS)
def test_each_kind_of_problem_is_reported_with_its_path(
    mutate: Any, expected: tuple[str, str]
) -> None:
    assert expected in _problems(mutate)


def test_dose_in_a_non_medicine_session_is_rejected() -> None:
    def mutate(d: dict[str, Any]) -> None:
        d["sessions"].append(
            {
                "id": "s-prep",
                "type": "preparation",
                "status": "completed",
                "start": "2026-02-20T10:00:00-05:00",
                "therapists": ["t-lead"],
            }
        )
        d["doses"][0]["sessionId"] = "s-prep"

    assert ("doses[0].sessionId", "a dose must belong to a medicine session") in _problems(mutate)


def test_every_problem_is_listed_at_once() -> None:
    def mutate(d: dict[str, Any]) -> None:
        d["sessions"][0]["status"] = "done"
        d["doses"][0]["sessionId"] = "nope"
        d["vitals"][2]["takenAt"] = "yesterday"
        d["assessments"][0]["score"] = -1

    paths = [p for p, _ in _problems(mutate)]
    assert paths == [
        "assessments[0].score",
        "sessions[0].status",
        "vitals[2].takenAt",
        "doses[0].sessionId",
    ]


@pytest.mark.parametrize("value", ["1984", "1984-07", "1984-07-19"])
def test_partial_dates_are_accepted(value: str) -> None:
    assert _problems(lambda d: d["patient"].update(birthDate=value)) == []


def test_no_patient_value_is_echoed() -> None:
    secret = "Zelda-Quintessa-1234"

    def mutate(d: dict[str, Any]) -> None:
        d["patient"]["birthDate"] = secret
        d["patient"]["sex"] = secret
        d["patient"]["name"]["family"] = 42
        d["patient"]["mrn"] = {"x": secret}
        d["doses"][0]["sessionId"] = secret
        d["vitals"][0]["id"] = "v-2"
        d["adverseEvents"][0]["term"] = [secret]
        d["patient"][secret] = 1

    text = json.dumps(_problems(mutate))
    assert secret not in text and "42" not in text and "v-2" not in text.replace("vitals", "")


def test_non_object_documents() -> None:
    assert [(i.expression, i.diagnostics) for i in VALIDATOR.validate([1, 2])] == [
        (("$",), "must be of type object")
    ]


# Values where two JSON Schema implementations could disagree: regex anchors before a trailing
# newline, calendar checks in the custom formats, Unicode digits, integral floats.
EDGE_VALUES: list[tuple[str, str, Any]] = [
    ("patient", "birthDate", "1984-07-19\n"),
    ("patient", "birthDate", "1984-02-30"),
    ("patient", "birthDate", "2024-02-29"),
    ("patient", "birthDate", "1984-13"),
    ("patient", "birthDate", "١٩٨٤"),
    ("patient", "mrn", "MRN-0001\n"),
    ("patient", "birthDate", 1984),
]


def _fast_and_full(doc: Any) -> tuple[bool, bool]:
    """The verdicts of the jsonschema-rs fast path and of the Python validator, separately."""
    fast = VALIDATOR._fast.is_valid(doc)
    full = not list(VALIDATOR._validator.iter_errors(doc))
    return fast, full


@pytest.mark.parametrize("index", range(len(PROBLEMS)))
def test_fast_path_agrees_with_the_full_validator_on_every_rejection(index: int) -> None:
    # A document the fast path accepts is never looked at again: it must reject everything
    # the full validator rejects (schema problems; integrity rules run on both paths).
    doc = copy.deepcopy(GOOD)
    PROBLEMS[index][0](doc)
    fast, full = _fast_and_full(doc)
    assert fast == full


@pytest.mark.parametrize(("record", "field", "value"), EDGE_VALUES)
def test_fast_path_never_accepts_what_the_full_validator_rejects(
    record: str, field: str, value: Any
) -> None:
    doc = copy.deepcopy(GOOD)
    doc[record][field] = value
    fast, full = _fast_and_full(doc)
    assert not (fast and not full)


def test_fast_path_accepts_the_fixture() -> None:
    assert _fast_and_full(GOOD) == (True, True)


@pytest.mark.parametrize("value", [{}, [], {"id": "s-med-1"}, ["s-med-1"]])
def test_a_reference_of_the_wrong_type_is_a_schema_problem_not_a_crash(value: Any) -> None:
    # Found by Schemathesis: a filtered reference rule looked an object up in a set (500).
    problems = _problems(lambda d: d["doses"][0].update(sessionId=value))
    assert [p for p in problems if p[0] == "doses[0].sessionId"]
