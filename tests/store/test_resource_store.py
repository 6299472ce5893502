"""Contract tests of ResourceStore, run on SQLite and (when reachable) PostgreSQL."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import event, func, select

from fhirbridge.errors import BadRequestError, GoneError, NotFoundError
from fhirbridge.store.query import parse_search
from fhirbridge.store.resources import ResourceStore, SaveResult
from fhirbridge.store.schema import resource_history, submissions
from tests.store import data as d

T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
T1 = datetime(2026, 3, 5, 8, 0, 0, tzinfo=UTC)


def save(
    store: ResourceStore,
    resources: list[dict[str, Any]],
    *,
    content_hash: str | None = None,
    now: datetime = T0,
    source: str = "clinic-a",
) -> SaveResult:
    return store.save_submission(
        submission_id=str(uuid.uuid4()),
        source=source,
        patient_id=d.PATIENT,
        content_hash=content_hash or uuid.uuid4().hex,
        resources=resources,
        summary={"resources": len(resources)},
        now=now,
    )


def found(store: ResourceStore, rtype: str, *params: tuple[str, str]) -> set[str]:
    page = store.search(rtype, parse_search(rtype, params, max_count=1000, default_count=1000))
    assert page.total == len(page.entries)
    return {e.id for e in page.entries}


# --------------------------------------------------------------------------- versioning


def test_create_sets_version_1_and_meta(store: ResourceStore) -> None:
    patient = d.patient()
    result = save(store, [patient, d.heart_rate()])

    assert result.created and result.changed
    assert [(r.resource_type, r.id, r.version_id, r.outcome) for r in result.resources] == [
        ("Patient", d.PATIENT, "1", "created"),
        ("Observation", d.HEART_RATE, "1", "created"),
    ]
    stored = store.read("Patient", d.PATIENT)
    assert stored["meta"]["versionId"] == "1"
    assert stored["meta"]["lastUpdated"] == "2026-03-01T12:00:00.123+00:00"
    assert stored["meta"]["security"] == [d.SECURITY]  # kept
    assert stored["meta"]["profile"] == patient["meta"]["profile"]
    assert list(stored)[:3] == ["resourceType", "id", "meta"]
    assert {k: v for k, v in stored.items() if k != "meta"} == {
        k: v for k, v in patient.items() if k != "meta"
    }
    assert "versionId" not in patient["meta"]  # the input was not modified
    assert result.stored_resources[0] == stored
    observation = store.read("Observation", d.HEART_RATE)
    assert observation["meta"] == {
        "versionId": "1",
        "lastUpdated": "2026-03-01T12:00:00.123+00:00",
    }


def test_last_updated_is_utc_with_offset(store: ResourceStore) -> None:
    now = datetime(2026, 3, 1, 13, 0, 0, 999999, tzinfo=timezone(timedelta(hours=1)))
    save(store, [d.practitioner()], now=now)
    stored = store.read_stored("Practitioner", d.PRACTITIONER)
    assert stored.last_updated == "2026-03-01T12:00:00.999+00:00"
    assert stored.resource()["meta"]["lastUpdated"] == stored.last_updated
    assert stored.last_modified == datetime(2026, 3, 1, 12, 0, 0, 999000, tzinfo=UTC)


def test_identical_save_is_unchanged_without_history(store: ResourceStore) -> None:
    save(store, [d.patient(), d.heart_rate()])
    again = save(store, [d.patient(), d.heart_rate()], now=T1)

    assert again.created and not again.changed
    assert [(r.version_id, r.outcome) for r in again.resources] == [
        ("1", "unchanged"),
        ("1", "unchanged"),
    ]
    assert [v.version_id for v in store.history_stored("Observation", d.HEART_RATE)] == ["1"]
    current = store.read("Observation", d.HEART_RATE)
    assert current["meta"]["lastUpdated"] == "2026-03-01T12:00:00.123+00:00"
    assert again.stored_resources[1] == current


def test_changed_content_creates_version_2(store: ResourceStore) -> None:
    save(store, [d.heart_rate(value=72)])
    result = save(store, [d.heart_rate(value=88)], now=T1)

    assert [(r.version_id, r.outcome) for r in result.resources] == [("2", "updated")]
    current = store.read("Observation", d.HEART_RATE)
    assert current["valueQuantity"]["value"] == 88
    assert current["meta"] == {"versionId": "2", "lastUpdated": "2026-03-05T08:00:00.000+00:00"}
    first = store.vread("Observation", d.HEART_RATE, "1")
    assert first["valueQuantity"]["value"] == 72
    assert first["meta"]["versionId"] == "1"
    assert [h["meta"]["versionId"] for h in store.history("Observation", d.HEART_RATE)] == [
        "2",
        "1",
    ]
    assert store.vread_stored("Observation", d.HEART_RATE, "2").outcome == "updated"


def test_meta_change_other_than_version_is_an_update(store: ResourceStore) -> None:
    save(store, [d.patient()])
    relabelled = d.patient()
    relabelled["meta"] = {"security": []}
    result = save(store, [relabelled])
    assert result.resources[0].outcome == "updated"
    # ... but versionId/lastUpdated in the input are ignored for the comparison
    restamped = store.read("Patient", d.PATIENT)
    restamped["meta"]["lastUpdated"] = "1999-01-01T00:00:00Z"
    assert save(store, [restamped]).resources[0].outcome == "unchanged"


def test_same_submission_again_changes_nothing(store: ResourceStore) -> None:
    first = save(store, [d.heart_rate(value=72)], content_hash="sha256:abc")
    repeat = save(store, [d.heart_rate(value=72)], content_hash="sha256:abc")
    assert not repeat.created and not repeat.changed
    assert repeat.submission_id == first.submission_id
    assert [(r.version_id, r.outcome) for r in repeat.resources] == [("1", "unchanged")]
    assert repeat.stored_resources[0]["meta"]["versionId"] == "1"
    assert len(store.history("Observation", d.HEART_RATE)) == 1
    with store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(submissions)).scalar_one() == 1
    # another source with the same hash is a new submission
    other = save(store, [d.heart_rate(value=72)], content_hash="sha256:abc", source="clinic-b")
    assert other.created


def test_an_earlier_submission_applied_again_is_the_source_truth(store: ResourceStore) -> None:
    a = save(store, [d.heart_rate(value=72)], content_hash="h-a")
    save(store, [d.heart_rate(value=99)], content_hash="h-b")
    again = save(store, [d.heart_rate(value=72)], content_hash="h-a")
    assert not again.created and again.submission_id == a.submission_id
    assert [(r.version_id, r.outcome) for r in again.resources] == [("3", "updated")]
    assert store.read("Observation", d.HEART_RATE)["valueQuantity"]["value"] == 72


def test_import_records_are_written_only_when_something_changed(store: ResourceStore) -> None:
    def provenance(recorded: str) -> dict[str, Any]:
        return {
            "resourceType": "Provenance",
            "id": "9d0f1e2a-3b4c-4d5e-8f6a-7b8c9d0e1f2a",
            "target": [{"reference": f"Observation/{d.HEART_RATE}"}],
            "recorded": recorded,
            "agent": [{"who": {"display": "fhirbridge"}}],
        }

    save(
        store,
        [d.heart_rate(value=72), provenance("2026-03-01T12:00:00.000+00:00")],
        content_hash="h-1",
    )
    repeat = save(
        store,
        [d.heart_rate(value=72), provenance("2026-03-02T12:00:00.000+00:00")],
        content_hash="h-1",
    )
    assert [(r.resource_type, r.version_id, r.outcome) for r in repeat.resources] == [
        ("Observation", "1", "unchanged"),
        ("Provenance", "1", "unchanged"),
    ]
    assert repeat.stored_resources[1]["recorded"] == "2026-03-01T12:00:00.000+00:00"
    changed = save(
        store,
        [d.heart_rate(value=80), provenance("2026-03-03T12:00:00.000+00:00")],
        content_hash="h-1",
    )
    assert [(r.version_id, r.outcome) for r in changed.resources] == [
        ("2", "updated"),
        ("2", "updated"),
    ]


def test_get_submission(store: ResourceStore) -> None:
    result = save(store, [d.patient()], content_hash="h-1")
    row = store.get_submission(result.submission_id)
    assert row == {
        "id": result.submission_id,
        "source": "clinic-a",
        "patient_id": d.PATIENT,
        "content_hash": "h-1",
        "received_at": T0,
        "summary": {"resources": 1},
    }
    assert store.get_submission(str(uuid.uuid4())) is None


def test_missing_resources_and_versions(store: ResourceStore) -> None:
    save(store, [d.patient()])
    with pytest.raises(NotFoundError):
        store.read("Patient", str(uuid.uuid4()))
    with pytest.raises(NotFoundError):
        store.read("Observation", d.PATIENT)  # right id, wrong type
    for vid in ("2", "0", "x", "99999999999999999999"):
        with pytest.raises(NotFoundError):
            store.vread("Patient", d.PATIENT, vid)
    with pytest.raises(NotFoundError):
        store.history("Patient", str(uuid.uuid4()))


def test_delete_then_recreate(store: ResourceStore) -> None:
    save(store, [d.heart_rate()])
    assert store.delete("Observation", d.HEART_RATE, now=T1) == "2"
    assert store.delete("Observation", d.HEART_RATE, now=T1) is None  # already deleted
    with pytest.raises(GoneError):
        store.read("Observation", d.HEART_RATE)
    with pytest.raises(GoneError):
        store.vread("Observation", d.HEART_RATE, "2")
    assert store.vread("Observation", d.HEART_RATE, "1")["status"] == "final"
    versions = store.history_stored("Observation", d.HEART_RATE)
    assert [(v.version_id, v.outcome, v.json is None) for v in versions] == [
        ("2", "deleted", True),
        ("1", "created", False),
    ]
    assert len(store.history("Observation", d.HEART_RATE)) == 1
    assert found(store, "Observation", ("code", "8867-4")) == set()
    assert found(store, "Observation") == set()
    with pytest.raises(NotFoundError):
        store.delete("Observation", str(uuid.uuid4()), now=T1)

    again = save(store, [d.heart_rate()], now=T1)
    assert [(r.version_id, r.outcome) for r in again.resources] == [("3", "created")]
    assert found(store, "Observation", ("code", "8867-4")) == {d.HEART_RATE}


def test_same_resource_twice_in_one_submission(store: ResourceStore) -> None:
    result = save(store, [d.heart_rate(value=1), d.heart_rate(value=2), d.heart_rate(value=2)])
    assert [(r.version_id, r.outcome) for r in result.resources] == [
        ("1", "created"),
        ("2", "updated"),
        ("2", "unchanged"),
    ]
    assert store.read("Observation", d.HEART_RATE)["valueQuantity"]["value"] == 2
    assert [v.version_id for v in store.history_stored("Observation", d.HEART_RATE)] == ["2", "1"]


def test_invalid_input_is_rejected(store: ResourceStore) -> None:
    with pytest.raises(ValueError):
        save(store, [{"resourceType": "Patient"}])
    with pytest.raises(ValueError):
        save(store, [d.patient()], now=datetime(2026, 1, 1))  # naive


def test_update_rebuilds_search_index(store: ResourceStore) -> None:
    save(store, [d.heart_rate()])
    changed = d.heart_rate()
    changed["code"] = {"coding": [{"system": d.LOINC, "code": "9279-1"}]}
    save(store, [changed])
    assert found(store, "Observation", ("code", "8867-4")) == set()
    assert found(store, "Observation", ("code", "9279-1")) == {d.HEART_RATE}


def _statements(store: ResourceStore) -> Iterator[list[str]]:
    seen: list[str] = []

    def count(*args: Any) -> None:
        seen.append(args[2])

    event.listen(store.engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        event.remove(store.engine, "before_cursor_execute", count)


def _observations(n: int, value: int) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        obs = d.heart_rate(value=value)
        obs["id"] = str(uuid.UUID(int=i + 1))
        out.append(obs)
    return out


@pytest.mark.parametrize("phase", ["create", "update", "unchanged"])
def test_statement_count_does_not_grow_with_the_submission(
    store: ResourceStore, phase: str
) -> None:
    counts = []
    for n in (3, 120):
        if phase != "create":
            save(store, _observations(n, 1))
        value = 1 if phase == "unchanged" else 2
        for seen in _statements(store):
            save(store, _observations(n, value))
            counts.append(len(seen))
        with store.engine.begin() as conn:
            for table in ("fhir_search_index", "fhir_resource_history", "fhir_resource"):
                conn.exec_driver_sql(f"DELETE FROM {table}")
    assert counts[0] == counts[1], counts


# --------------------------------------------------------------------------- search


@pytest.fixture
def seeded(store: ResourceStore) -> ResourceStore:
    save(store, d.everything_for_patient())
    save(
        store,
        [d.patient(d.OTHER_PATIENT, mrn="MRN-0002"), d.other_observation()],
        now=T1,
    )
    return store


def test_search_by_id_and_last_updated(seeded: ResourceStore) -> None:
    assert found(seeded, "Patient", ("_id", d.PATIENT)) == {d.PATIENT}
    assert found(seeded, "Patient", ("_id", f"{d.PATIENT},{d.OTHER_PATIENT},nope")) == {
        d.PATIENT,
        d.OTHER_PATIENT,
    }
    assert found(seeded, "Patient", ("_id", "nope")) == set()
    assert found(seeded, "Patient") == {d.PATIENT, d.OTHER_PATIENT}
    assert found(seeded, "Patient", ("_lastUpdated", "2026-03-01")) == {d.PATIENT}
    assert found(seeded, "Patient", ("_lastUpdated", "gt2026-03-01")) == {d.OTHER_PATIENT}
    assert found(seeded, "Patient", ("_lastUpdated", "2026-03-01T12:00:00.123+00:00")) == {
        d.PATIENT
    }
    assert found(seeded, "Patient", ("_lastUpdated", "2026-03-01T13:00:00.123+01:00")) == {
        d.PATIENT
    }
    assert found(seeded, "Patient", ("_lastUpdated", "ge2026-03-05T08:00:00Z")) == {d.OTHER_PATIENT}
    assert found(seeded, "Patient", ("_lastUpdated", "lt2026-03-05T08:00:00Z")) == {d.PATIENT}
    assert found(seeded, "Patient", ("_lastUpdated", "ne2026-03")) == set()


@pytest.mark.parametrize(
    ("rtype", "value", "expected"),
    [
        ("Patient", f"{d.MRN}|MRN-0001", {d.PATIENT}),
        ("Patient", "MRN-0001", {d.PATIENT}),
        ("Patient", f"{d.MRN}|", {d.PATIENT, d.OTHER_PATIENT}),
        ("Patient", "|local-MRN-0002", {d.OTHER_PATIENT}),  # identifier without a system
        ("Patient", "|MRN-0001", set()),  # that one has a system
        ("Patient", "urn:other|MRN-0001", set()),
        ("Patient", "MRN-0001,MRN-0002", {d.PATIENT, d.OTHER_PATIENT}),
        ("Practitioner", "http://hl7.org/fhir/sid/us-npi|1234567893", {d.PRACTITIONER}),
        ("EpisodeOfCare", "urn:program|EP-1", {d.EPISODE}),
        ("Encounter", "S-1", {d.ENCOUNTER}),
        ("Observation", "urn:obs|BP-1", {d.BLOOD_PRESSURE}),
        ("Procedure", "urn:proc|P-1", {d.PROCEDURE}),
        ("MedicationAdministration", "urn:dose|D-1", {d.ADMINISTRATION}),
        ("AdverseEvent", "urn:ae|AE-1", {d.ADVERSE_EVENT}),
    ],
)
def test_search_identifier(
    seeded: ResourceStore, rtype: str, value: str, expected: set[str]
) -> None:
    assert found(seeded, rtype, ("identifier", value)) == expected


_MINE = {d.HEART_RATE, d.BLOOD_PRESSURE}


@pytest.mark.parametrize(
    ("rtype", "param", "value", "expected"),
    [
        ("Observation", "patient", d.PATIENT, _MINE),
        ("Observation", "patient", f"Patient/{d.PATIENT}", _MINE),
        ("Observation", "patient", f"https://ehr.example.org/fhir/Patient/{d.PATIENT}", _MINE),
        ("Observation", "patient", f"Patient/{d.PATIENT}/_history/1", _MINE),
        ("Observation", "patient", f"{d.PATIENT},{d.OTHER_PATIENT}", {*_MINE, d.OTHER_OBSERVATION}),
        ("Observation", "patient", f"Group/{d.PATIENT}", set()),
        ("Observation", "subject", f"Patient/{d.PATIENT}", _MINE),
        ("Observation", "subject", d.PATIENT, _MINE),
        ("Observation", "subject:Patient", d.PATIENT, _MINE),
        ("Observation", "subject:Group", d.PATIENT, set()),
        ("Observation", "encounter", d.ENCOUNTER, _MINE),
        ("Observation", "encounter", f"Encounter/{d.ENCOUNTER}", _MINE),
        ("Encounter", "patient", d.PATIENT, {d.ENCOUNTER}),
        ("Encounter", "subject", f"Patient/{d.PATIENT}", {d.ENCOUNTER}),
        ("EpisodeOfCare", "patient", d.PATIENT, {d.EPISODE}),
        ("Procedure", "patient", d.PATIENT, {d.PROCEDURE}),
        ("Procedure", "subject", d.PATIENT, {d.PROCEDURE}),
        ("Procedure", "encounter", d.ENCOUNTER, {d.PROCEDURE}),
        (
            "MedicationAdministration",
            "patient",
            d.PATIENT,
            {d.ADMINISTRATION, d.ADMINISTRATION_REF},
        ),
        (
            "MedicationAdministration",
            "subject",
            d.PATIENT,
            {d.ADMINISTRATION, d.ADMINISTRATION_REF},
        ),
        (
            "MedicationAdministration",
            "context",
            d.ENCOUNTER,
            {d.ADMINISTRATION, d.ADMINISTRATION_REF},
        ),
        ("MedicationAdministration", "context", f"EpisodeOfCare/{d.ENCOUNTER}", set()),
        ("AdverseEvent", "subject", d.PATIENT, {d.ADVERSE_EVENT}),
        ("AdverseEvent", "subject", f"Patient/{d.OTHER_PATIENT}", set()),
        ("Provenance", "patient", d.PATIENT, {d.PROVENANCE}),
        ("Provenance", "target", f"Observation/{d.HEART_RATE}", {d.PROVENANCE}),
        ("Provenance", "target", d.HEART_RATE, {d.PROVENANCE}),
    ],
)
def test_search_reference(
    seeded: ResourceStore, rtype: str, param: str, value: str, expected: set[str]
) -> None:
    assert found(seeded, rtype, (param, value)) == expected


@pytest.mark.parametrize(
    ("rtype", "param", "value", "expected"),
    [
        ("Observation", "code", f"{d.LOINC}|8867-4", {d.HEART_RATE, d.OTHER_OBSERVATION}),
        ("Observation", "code", "8867-4", {d.HEART_RATE, d.OTHER_OBSERVATION}),
        ("Observation", "code", "8480-6", set()),  # a component code is not `code`
        ("Observation", "code", f"{d.SNOMED}|8867-4", set()),
        ("Observation", "code", "|8867-4", set()),
        (
            "Observation",
            "code",
            f"{d.LOINC}|",
            {d.HEART_RATE, d.BLOOD_PRESSURE, d.OTHER_OBSERVATION},
        ),
        ("Observation", "code", "8867-4,85354-9", {*_MINE, d.OTHER_OBSERVATION}),
        ("Observation", "category", "vital-signs", _MINE),
        ("Observation", "category", f"{d.OBS_CATEGORY}|survey", {d.OTHER_OBSERVATION}),
        ("Procedure", "code", f"{d.SNOMED}|75516001", {d.PROCEDURE}),
        ("Medication", "code", "387542000", {d.MEDICATION}),
        ("MedicationAdministration", "code", f"{d.SNOMED}|387542000", {d.ADMINISTRATION}),
        ("AdverseEvent", "event", "25064002", {d.ADVERSE_EVENT}),
    ],
)
def test_search_token(
    seeded: ResourceStore, rtype: str, param: str, value: str, expected: set[str]
) -> None:
    assert found(seeded, rtype, (param, value)) == expected


HR, BP, OTHER = d.HEART_RATE, d.BLOOD_PRESSURE, d.OTHER_OBSERVATION


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # heart rate: 2026-03-01T08:30:00Z (written +02:00); blood pressure: a period
        # 2026-03-01T23:30Z (written -05:00) .. 2026-03-02T00:30Z; other: "2025-06" (a month)
        ("2026-03-01", {HR}),
        ("eq2026-03-01", {HR}),
        ("2026-03", {HR, BP}),
        ("2026", {HR, BP}),
        ("2025", {OTHER}),
        ("2025-06-15", set()),  # the month is not within that day
        ("ne2026-03-01", {BP, OTHER}),
        ("lt2026-03-01", {OTHER}),
        ("gt2026-03-01", {BP}),
        ("ge2026-03-01", {HR, BP}),
        ("le2026-03-01", {HR, OTHER}),
        ("sa2026-02", {HR, BP}),
        ("sa2026-03-01", set()),  # BP starts on that day
        ("sa2026-03-01T12:00:00Z", {BP}),
        ("eb2026-03-01", {OTHER}),
        ("eb2026-03", {OTHER}),
        ("2026-03-02", set()),  # BP only overlaps that day
        ("2026-03-01T08:30:00Z", {HR}),
        ("2026-03-01T10:30:00+02:00", {HR}),
        ("2026-03-01T03:30:00-05:00", {HR}),
        ("2026-03-01T10:30:00Z", set()),
        ("2026-03-01T08:30Z", {HR}),  # minute precision
        ("2026-03-01T08:30:00.5Z", set()),  # finer than the stored value
        ("gt2026-03-01T08:30:00Z", {BP}),
        ("ge2026-03-01T08:30:00Z", {HR, BP}),
        ("lt2026-03-01T23:45:00Z", {HR, BP, OTHER}),
        ("eb2026-03-01T23:45:00Z", {HR, OTHER}),
        ("2026-03-01T08:30:00Z,2025", {HR, OTHER}),
    ],
)
def test_search_observation_date(seeded: ResourceStore, value: str, expected: set[str]) -> None:
    assert found(seeded, "Observation", ("date", value)) == expected


@pytest.mark.parametrize(
    ("rtype", "param", "value", "expected"),
    [
        ("EpisodeOfCare", "date", "ge2026-03", {d.EPISODE}),  # open-ended period
        ("EpisodeOfCare", "date", "sa2026-01", {d.EPISODE}),
        ("EpisodeOfCare", "date", "lt2026-02-01", set()),
        ("EpisodeOfCare", "date", "2026-02", set()),
        ("EpisodeOfCare", "date", "eb2030", set()),
        ("EpisodeOfCare", "date", "gt2099", {d.EPISODE}),
        ("Encounter", "date", "2026-03-01", {d.ENCOUNTER}),
        ("Encounter", "date", "2026-03-01T12:00:00Z", set()),
        ("Encounter", "date", "ne2026-03-01T12:00:00Z", {d.ENCOUNTER}),
        ("Encounter", "date", "sa2026-03-01T06:59:59Z", {d.ENCOUNTER}),
        ("Encounter", "date", "sa2026-03-01T07:00:00Z", set()),
        ("Procedure", "date", "2026-03-01", {d.PROCEDURE}),
        ("Procedure", "date", "eb2026-03-01T14:46:00Z", {d.PROCEDURE}),
        (
            "MedicationAdministration",
            "effective-time",
            "2026-03-01",
            {d.ADMINISTRATION, d.ADMINISTRATION_REF},
        ),
        (
            "MedicationAdministration",
            "effective-time",
            "ge2026-03-01T09:00:00Z",
            {d.ADMINISTRATION_REF},
        ),
        (
            "MedicationAdministration",
            "effective-time",
            "lt2026-03-01T08:00:00Z",
            {d.ADMINISTRATION},
        ),
        ("AdverseEvent", "date", "2026-03-01T11:00:00Z", {d.ADVERSE_EVENT}),
        ("AdverseEvent", "date", "2026-03-02", set()),
        ("Provenance", "recorded", "2026-03-02T07:00:00.250Z", {d.PROVENANCE}),
        ("Provenance", "recorded", "2026-03-02T08:00:00+01:00", {d.PROVENANCE}),
        ("Provenance", "recorded", "2026-03-02T07:00:00.251Z", set()),
    ],
)
def test_search_other_dates(
    seeded: ResourceStore, rtype: str, param: str, value: str, expected: set[str]
) -> None:
    assert found(seeded, rtype, (param, value)) == expected


def test_parameters_are_anded_values_ored(seeded: ResourceStore) -> None:
    assert found(seeded, "Observation", ("code", "8867-4,85354-9"), ("patient", d.PATIENT)) == _MINE
    assert found(
        seeded, "Observation", ("date", "ge2026-03-01"), ("date", "lt2026-03-01T12:00:00Z")
    ) == {HR}
    assert found(seeded, "Observation", ("code", "8867-4"), ("category", "survey")) == {OTHER}
    assert found(seeded, "Observation", ("code", "85354-9"), ("category", "survey")) == set()


def _page_ids(store: ResourceStore, *params: tuple[str, str]) -> tuple[int, list[str]]:
    page = store.search("Observation", parse_search("Observation", params))
    return page.total, [e.id for e in page.entries]


def test_paging_and_sorting(seeded: ResourceStore) -> None:
    seen: list[str] = []
    for offset in range(4):
        total, ids = _page_ids(seeded, ("_count", "1"), ("_offset", str(offset)))
        assert total == 3
        seen.extend(ids)
    assert sorted(seen) == sorted([HR, BP, OTHER])

    assert _page_ids(seeded, ("_sort", "date"))[1] == [OTHER, HR, BP]
    assert _page_ids(seeded, ("_sort", "-date"))[1] == [BP, HR, OTHER]
    assert _page_ids(seeded, ("_sort", "_id"))[1] == sorted([HR, BP, OTHER])
    assert _page_ids(seeded, ("_sort", "-_id"))[1] == sorted([HR, BP, OTHER], reverse=True)
    assert _page_ids(seeded, ("_sort", "-_lastUpdated,_id"))[1] == [OTHER, *sorted([HR, BP])]
    assert _page_ids(seeded, ("_sort", "date"), ("_count", "2"), ("_offset", "1"))[1] == [HR, BP]
    assert _page_ids(seeded, ("_count", "0")) == (3, [])
    assert _page_ids(seeded, ("_offset", "10")) == (3, [])
    # a resource without a value for the sort parameter comes last, both ways
    assert found(seeded, "Procedure") == {d.PROCEDURE}
    page = seeded.search("Patient", parse_search("Patient", [("_sort", "-_lastUpdated")]))
    assert [e.id for e in page.entries] == [d.OTHER_PATIENT, d.PATIENT]


def test_sort_puts_missing_values_last(store: ResourceStore) -> None:
    undated = d.heart_rate()
    del undated["effectiveDateTime"]
    undated["id"] = str(uuid.uuid4())
    save(store, [undated, d.heart_rate(), d.other_observation()])
    assert _page_ids(store, ("_sort", "date"))[1] == [OTHER, HR, undated["id"]]
    assert _page_ids(store, ("_sort", "-date"))[1] == [HR, OTHER, undated["id"]]


@pytest.mark.parametrize(
    "params",
    [
        [("date", "yesterday")],
        [("date", "ap2026")],
        [("date", "xx2026")],
        [("date", "2026-13")],
        [("date", "2026-02-30")],
        [("date", "2026-03-01T25:00:00Z")],
        [("date", "2026-03-01T10:00:00+15:00")],
        [("code", "a|b|c")],
        [("code", "|")],
        [("patient", "not a reference")],
        [("patient", "Patient/")],
        [("patient:Group", d.PATIENT)],  # `patient` only points at Patients
        [("code:text", "heart")],
        [("date:missing", "true")],
        [("_count", "-1")],
        [("_count", "ten")],
        [("_offset", "1.5")],
        [("code", "a\x00b")],
        [("code", ",".join(["x"] * 1001))],
    ],
)
def test_malformed_values_are_rejected_without_echo(params: list[tuple[str, str]]) -> None:
    with pytest.raises(BadRequestError) as info:
        parse_search("Observation", params)
    value = params[0][1]
    rendered = str(info.value.outcome())
    assert info.value.http_status == 400
    if len(value) > 3:
        assert value not in rendered


def test_unknown_parameters(seeded: ResourceStore) -> None:
    lenient = parse_search("Observation", [("foo", "bar"), ("code", "8867-4"), ("_sort", "nope")])
    assert lenient.ignored == ("foo", "_sort")
    assert lenient.used == (("code", "8867-4"),)
    assert {e.id for e in seeded.search("Observation", lenient).entries} == {HR, OTHER}
    with pytest.raises(BadRequestError) as info:
        parse_search("Observation", [("foo", "bar"), ("name", "x")], strict=True)
    assert [i.diagnostics for i in info.value.issues] == [
        "unknown search parameter 'foo' for Observation",
        "unknown search parameter 'name' for Observation",
    ]
    with pytest.raises(BadRequestError):
        parse_search("Observation", [("_sort", "code")], strict=True)
    # empty values are ignored, strict or not
    assert parse_search("Observation", [("code", "")], strict=True).criteria == ()


def test_count_is_clamped() -> None:
    assert parse_search("Observation", [("_count", "100000")], max_count=500).count == 500
    assert parse_search("Observation", [], default_count=20).count == 20


def test_escaped_values(store: ResourceStore) -> None:
    odd = d.patient()
    odd["identifier"] = [{"system": "urn:x", "value": r"a,b|c\d$e"}]
    save(store, [odd])
    assert found(store, "Patient", ("identifier", r"urn:x|a\,b\|c\\d\$e")) == {d.PATIENT}
    assert found(store, "Patient", ("identifier", r"a\,b\|c\\d$e")) == {d.PATIENT}
    assert found(store, "Patient", ("identifier", r"a,b")) == set()


# --------------------------------------------------------------------------- $everything


def test_everything(seeded: ResourceStore) -> None:
    result = seeded.everything_stored(d.PATIENT)
    assert result.matches[0].resource_type == "Patient"
    assert {(v.resource_type, v.id) for v in result.matches} == {
        ("Patient", d.PATIENT),
        ("EpisodeOfCare", d.EPISODE),
        ("Encounter", d.ENCOUNTER),
        ("Observation", d.HEART_RATE),
        ("Observation", d.BLOOD_PRESSURE),
        ("Procedure", d.PROCEDURE),
        ("MedicationAdministration", d.ADMINISTRATION),
        ("MedicationAdministration", d.ADMINISTRATION_REF),
        ("AdverseEvent", d.ADVERSE_EVENT),
        ("Provenance", d.PROVENANCE),
    }
    assert [(v.resource_type, v.id) for v in result.included] == [
        ("Medication", d.MEDICATION),
        ("Practitioner", d.PRACTITIONER),
    ]
    parsed = seeded.everything(d.PATIENT)
    assert len(parsed) == 12
    assert all(r["meta"]["versionId"] == "1" for r in parsed)

    other = seeded.everything(d.OTHER_PATIENT)
    assert [(r["resourceType"], r["id"]) for r in other] == [
        ("Patient", d.OTHER_PATIENT),
        ("Observation", d.OTHER_OBSERVATION),
    ]


def test_everything_filters(seeded: ResourceStore) -> None:
    only = seeded.everything_stored(d.PATIENT, types={"Observation", "Practitioner"})
    assert {v.id for v in only.matches} == {HR, BP}
    assert [v.id for v in only.included] == [d.PRACTITIONER]
    save(seeded, [d.heart_rate(value=99)], now=T1)
    recent = seeded.everything_stored(d.PATIENT, since=T1)
    assert [v.id for v in recent.matches] == [HR]
    assert [v.id for v in recent.included] == []  # not updated since T1
    with pytest.raises(NotFoundError):
        seeded.everything(str(uuid.uuid4()))
    seeded.delete("Patient", d.PATIENT, now=T1)
    with pytest.raises(GoneError):
        seeded.everything(d.PATIENT)


# --------------------------------------------------------------------------- concurrency


def _run_concurrently(*jobs: Any) -> list[BaseException]:
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(jobs))

    def run(job: Any) -> None:
        try:
            barrier.wait()
            job()
        except BaseException as exc:  # reported by the test, not by the thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return errors


def test_concurrent_updates_lose_no_version(store: ResourceStore) -> None:
    save(store, [d.heart_rate(value=0)])
    rounds = 12

    def writer(base: int) -> None:
        for i in range(rounds):
            save(store, [d.patient(), d.heart_rate(value=base + i)], now=datetime.now(UTC))

    assert _run_concurrently(lambda: writer(1000), lambda: writer(2000)) == []
    versions = [int(v.version_id) for v in store.history_stored("Observation", d.HEART_RATE)]
    assert versions == list(range(2 * rounds + 1, 0, -1))
    assert store.read("Observation", d.HEART_RATE)["meta"]["versionId"] == str(2 * rounds + 1)
    assert [v.version_id for v in store.history_stored("Patient", d.PATIENT)] == ["1"]
    with store.engine.connect() as conn:
        rows = conn.execute(select(func.count()).select_from(resource_history)).scalar_one()
    assert rows == 2 * rounds + 2


def test_concurrent_first_creates(store: ResourceStore) -> None:
    ids = [str(uuid.uuid4()) for _ in range(8)]
    results: list[SaveResult] = []

    def creator(value: int) -> None:
        batch = []
        for rid in ids:
            obs = d.heart_rate(value=value)
            obs["id"] = rid
            batch.append(obs)
        results.append(save(store, batch, now=datetime.now(UTC)))

    assert _run_concurrently(lambda: creator(1), lambda: creator(2)) == []
    outcomes = sorted({r.outcome for res in results for r in res.resources})
    assert outcomes == ["created", "updated"]
    for rid in ids:
        assert [v.version_id for v in store.history_stored("Observation", rid)] == ["2", "1"]


def test_concurrent_identical_submissions(store: ResourceStore) -> None:
    results: list[SaveResult] = []

    def submit() -> None:
        results.append(save(store, [d.patient(), d.heart_rate()], content_hash="same"))

    assert _run_concurrently(submit, submit, submit) == []
    assert sorted(r.created for r in results) == [False, False, True]
    assert len({r.submission_id for r in results}) == 1
    assert [v.version_id for v in store.history_stored("Observation", d.HEART_RATE)] == ["1"]
