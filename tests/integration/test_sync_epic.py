"""The epic profile against a real FHIR server (sekmet standing in for the hospital's Epic).

The hospital already holds the patients (with its MRN) and, for one of them, the encounter the
session took place in. fhirbridge must match the patients instead of creating them, file the
vitals and the procedure against the hospital's encounter, turn what Epic cannot create
(medication administrations, adverse events, our encounter) into DocumentReference notes, skip
reference data, and make everything else wait visibly: nothing of a type Epic cannot create
reaches the server, and every one of our resources has a ledger row that says why it stands
where it stands.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fhirbridge.store.resources import ResourceStore
from fhirbridge.sync.outbox import Delivery, Outbox
from fhirbridge.sync.runtime import build_runtimes, routes
from fhirbridge.sync.targets import load_targets
from fhirbridge.sync.worker import Worker
from tests.integration.fhir_server import FhirServer
from tests.integration.sync_support import DOC, distinct, map_one, queue, write_targets

pytestmark = pytest.mark.integration

MRN_SYSTEM = "urn:oid:1.2.840.114350.1.13.0.1.7.5.737384.14"  # the hospital's MRN system
NOT_ON_EPIC = (
    "MedicationAdministration",
    "AdverseEvent",
    "Encounter",
    "EpisodeOfCare",
    "Practitioner",
    "Medication",
    "Provenance",
)
AMB = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}


class Clock:
    """The worker's clock: real time plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


def _hospital_patient(server: FhirServer, mrn: str) -> str:
    r = server.request(
        "POST",
        "Patient",
        json={
            "resourceType": "Patient",
            "identifier": [{"system": MRN_SYSTEM, "value": mrn}],
            "name": [{"family": "Hospital-Registered"}],
        },
    )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _hospital_encounter(server: FhirServer, patient_id: str, start: str) -> str:
    # open (no end), as Epic wants it: "writes must link an open Encounter"
    r = server.request(
        "POST",
        "Encounter",
        json={
            "resourceType": "Encounter",
            "status": "in-progress",
            "class": AMB,
            "subject": {"reference": f"Patient/{patient_id}"},
            "period": {"start": start},
        },
    )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _drain(worker: Worker, passes: int = 50) -> int:
    total = 0
    for _ in range(passes):
        handled = worker.run_once()
        total += handled
        if not handled:
            return total
    raise AssertionError(f"still busy after {passes} passes")


def _explained(row: Delivery) -> bool:
    """A final or waiting state, with a reason a person can read."""
    if row.status == "sent":
        return row.action in ("create", "put", "matched") and row.server_id is not None
    if row.status == "fallback":
        return row.action == "note" and bool(row.last_error) and row.server_id is not None
    if row.status == "skipped":
        return row.action == "skip" and bool(row.last_error)
    if row.status == "waiting":
        return bool(row.last_error)
    return False


def test_epic_matches_patients_files_against_existing_encounters_and_explains_the_rest(
    tmp_path: Path, fhir_server: FhirServer
) -> None:
    # --- the hospital's side: three registered patients, one open encounter for A, and an
    # encounter of another patient at the same time (must not be picked)
    hospital = {m: _hospital_patient(fhir_server, m) for m in ("MRN-A", "MRN-B", "MRN-OTHER")}
    # our session starts 2026-03-02T09:00:00-05:00 (14:00Z): inside A's open encounter
    enc_a = _hospital_encounter(fhir_server, hospital["MRN-A"], "2026-03-02T13:30:00Z")
    _hospital_encounter(fhir_server, hospital["MRN-OTHER"], "2026-03-02T13:00:00Z")
    patients_before = fhir_server.count("Patient")
    encounters_before = fhir_server.count("Encounter")

    # --- fhirbridge's side: the target file, three submissions (C is not known to the hospital)
    targets_file = write_targets(
        tmp_path / "targets.yaml",
        [
            {
                "name": "st-olaf-epic",
                "base_url": fhir_server.base_url,
                "profile": "epic",
                "patient_identifier": {"system": MRN_SYSTEM, "source": "mrn"},
                "timeout": 10,
            }
        ],
    )
    targets = load_targets(targets_file, environ={})
    store = ResourceStore.from_url(f"sqlite:///{tmp_path / 'fb.db'}")
    store.create_schema()
    outbox = Outbox(store, routes(targets))
    runtimes = build_runtimes(targets)
    clock = Clock()
    worker = Worker(store, outbox, runtimes, owner="epic-test", clock=clock)
    try:
        docs = {
            "A": distinct(DOC, 1, mrn="MRN-A"),
            "B": distinct(DOC, 2, mrn="MRN-B"),
            "C": distinct(DOC, 3, mrn="MRN-C"),
        }
        results = {k: map_one(d) for k, d in docs.items()}
        ours = queue(store, outbox, results.values())
        patient_of = {
            k: next(r["id"] for r in res.resources if r["resourceType"] == "Patient")
            for k, res in results.items()
        }
        owner_of: dict[tuple[str, str], str] = {}  # shared Practitioners etc.: A's, as queued
        for k, res in results.items():
            for r in res.resources:
                owner_of.setdefault((r["resourceType"], r["id"]), k)
        assert _drain(worker) == len(ours)
        rows = {d.key: d for d in outbox.deliveries(limit=1000)}

        # --- nothing silent: every one of our resources has a row with a reason
        assert set(rows) == {(r["resourceType"], r["id"]) for r in ours}
        unexplained = [(k, d.status, d.action, d.last_error) for k, d in rows.items()]
        assert not [u for u, d in zip(unexplained, rows.values(), strict=True) if not _explained(d)]

        # --- the server: nothing Epic cannot create; patients matched, never created
        for rtype in NOT_ON_EPIC:
            expected = encounters_before if rtype == "Encounter" else 0
            assert fhir_server.count(rtype) == expected, rtype
        assert fhir_server.count("Patient") == patients_before
        for key, mrn in (("A", "MRN-A"), ("B", "MRN-B")):
            row = rows[("Patient", patient_of[key])]
            assert (row.status, row.action, row.server_id) == ("sent", "matched", hospital[mrn])
        row_c = rows[("Patient", patient_of["C"])]
        assert (row_c.status, row_c.last_error) == ("waiting", "patient not found on the target")

        def of(key: str) -> Counter[tuple[str, str, str | None]]:
            return Counter(
                (d.resource_type, d.status, d.last_error)
                for k, d in rows.items()
                if owner_of[k] == key and d.resource_type != "Patient"
            )

        # A: filed against the hospital's encounter; what Epic cannot create became notes
        no_encounter = (
            "the target files clinical writes only against an existing encounter, "
            "and this record references none"
        )
        assert of("A") == {
            ("Observation", "sent", None): 14,  # the vitals
            ("Procedure", "sent", None): 1,
            ("Encounter", "fallback", "the target cannot create Encounter"): 1,
            (
                "MedicationAdministration",
                "fallback",
                "the target cannot create MedicationAdministration",
            ): 2,
            ("AdverseEvent", "fallback", "the target cannot create AdverseEvent"): 2,
            ("Observation", "skipped", no_encounter): 1,  # the CAPS-5 score: no encounter
            ("EpisodeOfCare", "skipped", no_encounter): 1,
            ("Practitioner", "skipped", "the target cannot create Practitioner"): 2,
            ("Medication", "skipped", "the target cannot create Medication"): 1,
            ("Provenance", "skipped", "the target cannot create Provenance"): 1,
        }
        # B: matched, but the hospital has no encounter for the session: it waits, visibly
        wait = "no matching encounter on target"
        assert of("B") == {
            ("Observation", "waiting", wait): 14,
            ("Procedure", "waiting", wait): 1,
            ("Encounter", "waiting", wait): 1,
            ("MedicationAdministration", "waiting", wait): 2,
            ("AdverseEvent", "waiting", wait): 2,
            ("Observation", "skipped", no_encounter): 1,
            ("EpisodeOfCare", "skipped", no_encounter): 1,
            ("Provenance", "skipped", "the target cannot create Provenance"): 1,
        }
        # C: not registered at the hospital: everything waits for the patient
        gate = "waits for the patient to be matched on the target"
        assert set(of("C")) == {(t, "waiting", gate) for t, _, _ in of("C")}

        # what reached the server is A's, attached to the hospital's patient and encounter
        observations = fhir_server.search("Observation")
        assert len(observations) == 14
        assert {o["subject"]["reference"] for o in observations} == {f"Patient/{hospital['MRN-A']}"}
        assert {o["encounter"]["reference"] for o in observations} == {f"Encounter/{enc_a}"}
        assert not any("performer" in o for o in observations)  # Practitioners are not there
        ours_by_identifier = {
            (r["identifier"][0]["system"], r["identifier"][0]["value"]): r
            for r in results["A"].resources
            if r["resourceType"] == "Observation"
        }
        for o in observations:
            mine = ours_by_identifier[(o["identifier"][0]["system"], o["identifier"][0]["value"])]
            for element in ("status", "code", "effectiveDateTime", "valueQuantity", "component"):
                assert o.get(element) == mine.get(element), element
        notes = fhir_server.search("DocumentReference")
        assert len(notes) == 5  # the encounter, 2 administrations, 2 adverse events
        assert {n["subject"]["reference"] for n in notes} == {f"Patient/{hospital['MRN-A']}"}
        assert {n["context"]["encounter"][0]["reference"] for n in notes} == {f"Encounter/{enc_a}"}
        note_ids = {d.server_id for d in rows.values() if d.status == "fallback"}
        assert note_ids == {n["id"] for n in notes}

        # --- a second pass sends nothing: the waits are not due yet, the rest is settled
        assert worker.run_once() == 0

        # --- later the hospital opens B's encounter; once the recheck is due, B goes out
        enc_b = _hospital_encounter(fhir_server, hospital["MRN-B"], "2026-03-02T13:55:00Z")
        clock.offset = timedelta(minutes=6)
        _drain(worker)
        rows = {d.key: d for d in outbox.deliveries(limit=1000)}
        b_rows = [d for k, d in rows.items() if owner_of[k] == "B"]
        assert Counter(d.status for d in b_rows) == {"sent": 16, "fallback": 5, "skipped": 3}
        assert fhir_server.count("Observation") == 28
        assert fhir_server.count("DocumentReference") == 10
        assert len(fhir_server.search("Observation", encounter=f"Encounter/{enc_b}")) == 14
        assert fhir_server.count("Patient") == patients_before
        for rtype in NOT_ON_EPIC:
            expected = encounters_before + 1 if rtype == "Encounter" else 0
            assert fhir_server.count(rtype) == expected, rtype
        # C still waits for its patient, with the reason on every row
        c_rows = [d for k, d in rows.items() if owner_of[k] == "C"]
        assert {d.status for d in c_rows} == {"waiting"} and all(d.last_error for d in c_rows)
    finally:
        for rt in runtimes:
            rt.client.close()
        store.close()
