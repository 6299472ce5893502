"""The write planner on the medicine-session fixture, for generic R4, Epic and Oracle Health.

Every Bundle and every DocumentReference note a plan carries must pass the output validator; no
plan may hold a write the target's capabilities refuse (checked over random inputs too).
"""

from __future__ import annotations

import base64
import copy
import json
import random
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from fhirbridge.fhir.validate import OutputValidator
from fhirbridge.sync.capabilities import (
    Capabilities,
    TypeCaps,
    from_capability_statement,
    load_profile,
)
from fhirbridge.sync.planner import (
    Batch,
    Due,
    Fallback,
    Ledger,
    MatchPatient,
    Plan,
    SearchThenCreate,
    Single,
    Transaction,
    Update,
    Wait,
    note_for,
    plan,
    render,
)
from fhirbridge.sync.targets import NOTE_BY_DEFAULT, Target

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = json.loads((ROOT / "mappings" / "fixtures" / "medicine-session.out.json").read_bytes())
RESOURCES: list[dict[str, Any]] = [e["resource"] for e in FIXTURE["entry"]]
BY_KEY = {f"{r['resourceType']}/{r['id']}": r for r in RESOURCES}
VALIDATOR = OutputValidator()

PATIENT = "Patient/5bbb7d5a-29cd-52b3-b259-5b4683159aa8"
ENCOUNTER = "Encounter/768b8fb6-bec5-59da-8a2f-f0d125c87a21"
EPISODE = "EpisodeOfCare/e56761cd-ba19-5081-b7ba-d6afdb8c0a2a"
PROCEDURE = "Procedure/0bc9c8ce-d88c-55a0-a383-5b962a573b3c"
PRACTITIONERS = (
    "Practitioner/33d046f2-965f-5ac3-8d0b-a395eabc7c34",
    "Practitioner/437d4700-a8e3-5363-8cb4-cf59c4d344ec",
)
MA1 = "MedicationAdministration/4bc9a0cc-97b8-55c5-87c9-b0b755902dd9"
MA2 = "MedicationAdministration/b96d4d3c-fbd3-5534-83f4-39ee1ad3ba47"
AE1 = "AdverseEvent/5c25ceb2-ca26-525b-9fba-d327bf2ed52f"
AE2 = "AdverseEvent/4103ece6-6043-58e2-b0b3-c278432e231a"
CAPS5 = "Observation/3a006644-5a30-5d39-b987-7a8d2be54f87"  # baseline score, no encounter
PROVENANCE = "Provenance/70b79c85-67c5-57ec-acde-ac71daad061d"
VITALS = [k for k in BY_KEY if k.startswith("Observation/") and k != CAPS5]
MRN = "MRN-448812"

GENERIC = Target(
    name="research-store", base_url="https://hapi.example.org/fhir", profile="generic-r4"
)
EPIC = Target(
    name="st-olaf-epic",
    base_url="https://epic.example.org/api/FHIR/R4",
    profile="epic",
    patient_identifier={"system": "urn:oid:1.2.840.114350.1.13.0.1.7.5.737384.14"},
)
ORACLE = Target(
    name="mercy-oracle",
    base_url="https://oracle.example.org/r4/tenant",
    profile="oracle-health",
    patient_identifier={"system": "urn:oid:2.16.840.1.113883.3.13.6"},
)
EPIC_PATIENT = "Patient/eP1"
EPIC_ENCOUNTER = "Encounter/eE1"


def due(version: str = "1", keys: list[str] | None = None, **ledgers: Ledger) -> list[Due]:
    chosen = keys if keys is not None else list(BY_KEY)
    return [Due(copy.deepcopy(BY_KEY[k]), version, ledgers.get(k)) for k in chosen]


def run(target: Target, caps: Capabilities | None = None, items: list[Due] | None = None, **kw):
    kw.setdefault("server_refs", {})
    kw.setdefault("patient_ref", None)
    kw.setdefault("encounter_refs", {})
    result = plan(
        target, caps or load_profile(target.profile), due() if items is None else items, **kw
    )
    check_valid(result)
    json.dumps(result.to_dict())  # JSON-shaped
    return result


def check_valid(result: Plan) -> None:
    """Every Bundle and note in the plan passes the R4 output validator."""
    for step in result.steps:
        if isinstance(step, Transaction | Batch):
            assert VALIDATOR.validate(step.bundle()) == [], step.describe()
        if isinstance(step, Fallback) and step.note is not None:
            assert VALIDATOR.validate(step.note) == [], step.key


def steps_of(result: Plan, kind: type) -> list[Any]:
    return [s for s in result.steps if isinstance(s, kind)]


def refs_in(node: Any) -> list[str]:
    if isinstance(node, dict):
        out = [node["reference"]] if isinstance(node.get("reference"), str) else []
        for k, v in node.items():
            if k != "reference":
                out += refs_in(v)
        return out
    if isinstance(node, list):
        return [r for v in node for r in refs_in(v)]
    return []


def note_text(note: dict[str, Any]) -> str:
    return base64.b64decode(note["content"][0]["attachment"]["data"]).decode("utf-8")


def settled(result: Plan) -> list[str]:
    return [k for s in result.steps for k in s.settles()]


# --------------------------------------------------------------------------- generic R4


def test_generic_r4_is_one_transaction_of_puts_in_dependency_order():
    result = run(GENERIC)
    [step] = result.steps
    assert isinstance(step, Transaction)
    assert len(step.entries) == 27
    assert not step.awaiting and not step.unverifiable_retry
    keys = [e.key for e in step.entries]
    assert sorted(keys) == sorted(BY_KEY)
    for entry in step.entries:
        assert entry.method == "PUT" and entry.url == entry.key
        assert entry.full_url == f"urn:uuid:{entry.key.split('/')[1]}"
        assert entry.if_none_exist is None
        assert entry.resource == BY_KEY[entry.key]  # PUT to our ids: references unchanged
    # every reference points to an earlier entry
    for n, entry in enumerate(step.entries):
        for ref in refs_in(entry.resource):
            assert keys.index(ref) < n, (entry.key, ref)
    types = [k.split("/")[0] for k in keys]
    order = [
        "Patient",
        "Practitioner",
        "Medication",
        "EpisodeOfCare",
        "Encounter",
        "Procedure",
        "MedicationAdministration",
        "Observation",
        "AdverseEvent",
        "Provenance",
    ]
    assert sorted(types, key=order.index) == types
    # the bundle is the fixture's transaction, reordered
    bundle_entries = sorted(step.bundle()["entry"], key=lambda e: e["fullUrl"])
    assert bundle_entries == sorted(FIXTURE["entry"], key=lambda e: e["fullUrl"])


def test_generic_transaction_is_split_by_batch_size():
    target = GENERIC.model_copy(update={"batch_size": 10})
    result = run(target)
    transactions = steps_of(result, Transaction)
    assert [len(t.entries) for t in transactions] == [10, 10, 7]
    assert all(not t.awaiting for t in transactions)  # PUT to our ids: nothing to await


def _conditional_generic(*, ae_update_create: bool = False) -> Capabilities:
    """A generic server without update-as-create but with conditional create."""
    conditional = TypeCaps(
        read=True, search_identifier=True, create=True, update=True, conditional_create=True
    )
    ae = TypeCaps(read=True, create=True, update=True, update_create=ae_update_create)
    return replace(
        load_profile("generic-r4"),
        name="generic-conditional",
        unlisted=conditional,
        types=MappingProxyType({"AdverseEvent": ae, "Provenance": TypeCaps(True, False, True)}),
    )


def test_generic_without_update_create_uses_conditional_create_in_the_transaction():
    result = run(GENERIC, _conditional_generic())
    transaction, *rest = result.steps
    assert isinstance(transaction, Transaction)
    members = {e.key: e for e in transaction.entries}
    assert set(members) == set(BY_KEY) - {AE1, AE2, PROVENANCE}
    for entry in transaction.entries:
        assert entry.method == "POST" and entry.url == entry.key.split("/")[0]
        assert "id" not in entry.resource
        system = entry.resource["identifier"][0]["system"]
        value = entry.resource["identifier"][0]["value"]
        assert entry.if_none_exist == f"identifier={system}|{value}"
        # references inside the bundle are urn:uuid fullUrls
        for ref in refs_in(entry.resource):
            assert ref.startswith("urn:uuid:") and ref in {e.full_url for e in transaction.entries}
    assert not transaction.unverifiable_retry
    # AdverseEvent: no identifier search in R4, so no If-None-Exist and no search either: a plain
    # POST, flagged, kept out of the transaction so that the transaction stays re-sendable.
    ae_steps = [s for s in rest if s.settles()[0] in (AE1, AE2)]
    assert len(ae_steps) == 2
    for step in ae_steps:
        assert isinstance(step, Single)
        assert step.method == "POST" and step.if_none_exist is None
        assert step.unverifiable_retry
        assert MA1 in step.awaiting  # suspectEntity: created by the transaction
    [prov] = [s for s in rest if s.settles() == (PROVENANCE,)]
    assert isinstance(prov, Single) and prov.unverifiable_retry
    assert not any(isinstance(s, SearchThenCreate) for s in result.steps)


def test_generic_adverse_event_is_put_when_update_create_allows_it():
    result = run(GENERIC, _conditional_generic(ae_update_create=True))
    transaction = result.steps[0]
    assert isinstance(transaction, Transaction)
    entries = {e.key: e for e in transaction.entries}
    assert entries[AE1].method == "PUT" and entries[AE1].url == AE1
    assert entries[AE1].if_none_exist is None
    # its suspect dose is POSTed in the same transaction: urn:uuid reference
    suspect = entries[AE1].resource["suspectEntity"][0]["instance"]["reference"]
    assert suspect == f"urn:uuid:{MA1.split('/')[1]}"


def test_generic_with_patient_matching_and_create_patient():
    target = GENERIC.model_copy(
        update={"patient_identifier": EPIC.patient_identifier, "create_patient": True}
    )
    result = run(target)
    match, *waits = result.steps
    assert isinstance(match, MatchPatient) and EPIC.patient_identifier is not None
    assert (match.system, match.value) == (EPIC.patient_identifier.system, MRN)
    assert isinstance(match.create, Single) and match.create.method == "PUT"
    # the created patient carries the hospital identifier, so the next match finds it
    assert {"system": match.system, "value": MRN} in match.create.body["identifier"]
    assert all(isinstance(w, Wait) for w in waits) and len(waits) == 26
    assert MRN not in render(result)


# --------------------------------------------------------------------------- Epic


def test_epic_unmatched_patient_plans_the_match_and_nothing_else():
    result = run(EPIC)
    match, *rest = result.steps
    assert isinstance(match, MatchPatient) and match.key == PATIENT
    assert match.create is None  # epic: the hospital registers patients
    assert all(isinstance(s, Wait) for s in rest)
    assert {s.settles()[0] for s in rest} == set(BY_KEY) - {PATIENT}
    assert list(result.writes()) == []


def test_epic_without_encounter_waits_visibly():
    result = run(EPIC, patient_ref=EPIC_PATIENT)
    by_key = {s.settles()[0]: s for s in result.steps}
    assert set(by_key) == set(BY_KEY)
    for key in [*VITALS, PROCEDURE, ENCOUNTER, MA1, MA2, AE1, AE2]:
        step = by_key[key]
        assert isinstance(step, Wait), key
        assert step.reason == "no matching encounter on target"
    # records with no encounter at all cannot be filed on Epic
    for key in (CAPS5, EPISODE):
        assert isinstance(by_key[key], Fallback) and by_key[key].action == "skip"
        assert "encounter" in by_key[key].reason
    for key in (*PRACTITIONERS, PROVENANCE):
        assert isinstance(by_key[key], Fallback) and by_key[key].action == "skip"
    assert isinstance(by_key[PATIENT], Fallback) and "not overwritten" in by_key[PATIENT].reason
    assert list(result.writes()) == []


def test_epic_with_encounter_writes_observations_procedure_and_notes():
    result = run(
        EPIC, patient_ref=EPIC_PATIENT, encounter_refs={ENCOUNTER.split("/")[1]: EPIC_ENCOUNTER}
    )
    assert not steps_of(result, Transaction) and not steps_of(result, Batch)
    written = {w.resource_type for w in result.writes()}
    assert written == {"Observation", "Procedure", "DocumentReference"}
    by_key = {s.settles()[0]: s for s in result.steps}
    for key in [*VITALS, PROCEDURE]:
        step = by_key[key]
        # no update-as-create, no conditional create; the capture lists identifier search
        assert isinstance(step, SearchThenCreate), key
        assert step.identifier == "{system}|{value}".format(**BY_KEY[key]["identifier"][0])
        assert "id" not in step.body
        assert step.body["subject"] == {"reference": EPIC_PATIENT}
        assert step.body["encounter"] == {"reference": EPIC_ENCOUNTER}
        assert not step.awaiting
        assert VALIDATOR.validate(step.body) == []
    # Practitioners are not on Epic: the performer entries are dropped, not left dangling
    assert "performer" not in by_key[PROCEDURE].body
    assert "performer" not in by_key[VITALS[0]].body
    for key in (ENCOUNTER, MA1, MA2, AE1, AE2):
        step = by_key[key]
        assert isinstance(step, Fallback) and step.action == "note", key
        assert step.note is not None
        assert step.note["context"] == {"encounter": [{"reference": EPIC_ENCOUNTER}]}
        assert step.note["subject"] == {"reference": EPIC_PATIENT}
        assert isinstance(step.write, SearchThenCreate)  # DocumentReference: identifier search
        assert step.write.type == "DocumentReference"
    for key in (CAPS5, EPISODE, *PRACTITIONERS, PROVENANCE):
        assert isinstance(by_key[key], Fallback) and by_key[key].action == "skip"


def test_epic_never_writes_what_it_cannot_take():
    result = run(EPIC, patient_ref=EPIC_PATIENT, encounter_refs={ENCOUNTER: EPIC_ENCOUNTER})
    forbidden = {
        "MedicationAdministration",
        "AdverseEvent",
        "Encounter",
        "EpisodeOfCare",
        "MedicationRequest",
        "Practitioner",
        "Medication",
        "Provenance",
    }
    assert not forbidden & {w.resource_type for w in result.writes()}


# --------------------------------------------------------------------------- Oracle Health


def test_oracle_batches_by_level_and_notes_for_doses_and_adverse_events():
    result = run(ORACLE, patient_ref="Patient/oP1")
    assert not steps_of(result, Transaction)
    written = {w.resource_type for w in result.writes()}
    assert "MedicationAdministration" not in written and "AdverseEvent" not in written
    assert "Consent" not in written and "Medication" not in written
    assert "Encounter" in written  # creatable on Oracle
    by_key = {k: s for s in result.steps for k in s.settles()}
    for key in (MA1, MA2, AE1, AE2, EPISODE):
        step = by_key[key]
        assert isinstance(step, Fallback) and step.action == "note", key
        # DocumentReference: create only, no identifier search on Oracle
        assert isinstance(step.write, Single) and step.write.unverifiable_retry
        assert step.unverifiable_retry
    assert isinstance(by_key[ENCOUNTER], SearchThenCreate)  # Encounter?identifier is offered
    for key in PRACTITIONERS:
        assert isinstance(by_key[key], SearchThenCreate)
    batches = steps_of(result, Batch)
    assert batches
    levels = [b.level for b in batches]
    assert levels == sorted(levels) and len(set(levels)) == len(levels)  # one batch per level
    for batch in batches:
        assert batch.unverifiable_retry  # Observation/Procedure/Provenance: no identifier search
        assert all(e.method == "POST" and e.if_none_exist is None for e in batch.entries)
    assert {e.key for b in batches for e in b.entries} == {*VITALS, CAPS5, PROCEDURE, PROVENANCE}
    # vitals reference the Encounter, which is created first: the batch awaits it
    vitals_batch = next(b for b in batches if VITALS[0] in b.settles())
    assert ENCOUNTER in vitals_batch.awaiting


def test_oracle_replans_until_everything_is_on_the_target():
    """Simulate the worker: run the steps that await nothing, record ids, re-plan."""
    outcome = simulate(ORACLE, "Patient/oP1")
    sent = outcome["sent"]
    assert outcome["rounds"] <= 5
    assert set(outcome["settled"]) == set(BY_KEY)
    for body in sent:
        for ref in refs_in(body):
            # only what the target knows: its patient, its ids (never our ids, never urn:uuid)
            assert ref == "Patient/oP1" or ref.split("/")[1].startswith("srv-"), ref
    provenance = next(b for b in sent if b["resourceType"] == "Provenance")
    target_types = {r["reference"].split("/")[0] for r in provenance["target"]}
    assert target_types == {"Practitioner", "Encounter", "Procedure", "Observation"}


def test_generic_conditional_replans_to_completion():
    outcome = simulate(GENERIC, None, _conditional_generic())
    assert set(outcome["settled"]) == set(BY_KEY)
    # the transaction; then the AdverseEvents (they await its MedicationAdministrations);
    # then the Provenance (it awaits the AdverseEvents)
    assert outcome["rounds"] == 3


def simulate(target: Target, patient_ref: str | None, caps: Capabilities | None = None):
    caps = caps or load_profile(target.profile)
    server_refs: dict[str, str] = {}
    ledgers: dict[str, Ledger] = {}
    sent: list[dict[str, Any]] = []
    settled_keys: list[str] = []
    counter = iter(range(1, 10_000))
    for rounds in range(1, 20):  # noqa: B007
        items = [Due(copy.deepcopy(r), "1", ledgers.get(k)) for k, r in BY_KEY.items()]
        result = run(target, caps, items, server_refs=server_refs, patient_ref=patient_ref)
        progress = False
        for step in result.steps:
            if getattr(step, "awaiting", ()):
                continue
            if isinstance(step, Wait):
                continue
            progress = True
            for key in step.settles():
                sid = f"srv-{next(counter)}"
                if isinstance(step, Fallback):
                    if step.action == "note":
                        server_refs[key] = f"DocumentReference/{sid}"
                        ledgers[key] = Ledger(sid, "1", "1", "fallback")
                        sent.append(step.note or {})
                    else:
                        ledgers[key] = Ledger(None, None, "1", "skipped")
                else:
                    rtype = key.split("/")[0]
                    server_refs[key] = f"{rtype}/{sid}"
                    ledgers[key] = Ledger(sid, "1", "1", "sent")
                settled_keys.append(key)
            if isinstance(step, Batch | Transaction):
                sent += [e.resource for e in step.entries]
            elif isinstance(step, Single | SearchThenCreate):
                sent.append(step.body)
        if not progress:
            break
    return {"rounds": rounds - 1, "sent": sent, "settled": settled_keys}


# --------------------------------------------------------------------------- versions


def test_changed_version_is_an_update_with_if_match():
    key = VITALS[0]
    rid = key.split("/")[1]
    ledgers = {k: Ledger(k.split("/")[1], "1", "1", "sent") for k in BY_KEY}
    ledgers[key] = Ledger(rid, "3", "1", "queued")
    items = [Due(copy.deepcopy(BY_KEY[k]), "2" if k == key else "1", ledgers[k]) for k in BY_KEY]
    server_refs = {k: k for k in BY_KEY}
    result = run(GENERIC, items=items, server_refs=server_refs)
    [step] = result.steps
    assert isinstance(step, Update)
    assert (step.url, step.if_match) == (key, 'W/"3"')
    assert step.body["id"] == rid
    assert step.body == BY_KEY[key]


def test_update_uses_the_server_id_and_rewritten_references():
    key = VITALS[0]
    server_refs = {ENCOUNTER: "Encounter/oE9", key: "Observation/oO5"}
    items = [Due(copy.deepcopy(BY_KEY[key]), "2", Ledger("oO5", "7", "1", "queued"))]
    result = run(ORACLE, items=items, server_refs=server_refs, patient_ref="Patient/oP1")
    [step] = result.steps
    assert isinstance(step, Update)
    assert step.url == "Observation/oO5" and step.if_match == 'W/"7"'
    assert step.body["id"] == "oO5"
    assert step.body["encounter"] == {"reference": "Encounter/oE9"}
    assert step.body["subject"] == {"reference": "Patient/oP1"}


def test_epic_update_has_no_if_match():
    key = VITALS[0]
    server_refs = {key: "Observation/eO1"}
    items = [Due(copy.deepcopy(BY_KEY[key]), "2", Ledger("eO1", "4", "1", "queued"))]
    result = run(
        EPIC,
        items=items,
        server_refs=server_refs,
        patient_ref=EPIC_PATIENT,
        encounter_refs={ENCOUNTER: EPIC_ENCOUNTER},
    )
    [step] = result.steps
    assert isinstance(step, Update) and step.if_match is None


def test_a_type_the_target_cannot_update_falls_back():
    # Oracle Procedure: create only. A corrected session record becomes a note.
    server_refs = {PROCEDURE: "Procedure/oPr1", ENCOUNTER: "Encounter/oE1"}
    items = [Due(copy.deepcopy(BY_KEY[PROCEDURE]), "2", Ledger("oPr1", "1", "1", "queued"))]
    result = run(ORACLE, items=items, server_refs=server_refs, patient_ref="Patient/oP1")
    [step] = result.steps
    assert isinstance(step, Fallback) and step.action == "note"
    assert step.reason == "the target cannot update Procedure"
    assert step.note is not None
    assert step.note["context"] == {"encounter": [{"reference": "Encounter/oE1"}]}


def test_a_new_version_of_a_noted_record_updates_the_note():
    server_refs = {AE1: "DocumentReference/d77", ENCOUNTER: "Encounter/oE1"}
    items = [Due(copy.deepcopy(BY_KEY[AE1]), "2", Ledger("d77", "2", "1", "queued"))]
    result = run(ORACLE, items=items, server_refs=server_refs, patient_ref="Patient/oP1")
    [step] = result.steps
    assert isinstance(step, Fallback) and step.action == "note"
    assert isinstance(step.write, Update)
    assert (step.write.url, step.write.if_match) == ("DocumentReference/d77", 'W/"2"')
    assert step.write.body["id"] == "d77"


def test_already_sent_at_the_same_version_plans_nothing():
    ledgers = {k: Ledger(k.split("/")[1], "1", "1", "sent") for k in BY_KEY}
    items = [Due(copy.deepcopy(r), "1", ledgers[k]) for k, r in BY_KEY.items()]
    for target in (GENERIC, EPIC, ORACLE):
        result = run(target, items=items, server_refs={k: k for k in BY_KEY})
        assert result.steps == ()
        assert render(result).endswith("nothing to do")


# --------------------------------------------------------------------------- references


def test_missing_referenced_resource_waits():
    result = run(GENERIC, items=due(keys=[VITALS[0]]), server_refs={PATIENT: PATIENT})
    [step] = result.steps
    assert isinstance(step, Wait)
    assert step.reason == f"waits for {ENCOUNTER} to reach the target first"


def test_reference_to_a_delivered_resource_is_rewritten():
    server_refs = {ENCOUNTER: ENCOUNTER, PATIENT: PATIENT}
    result = run(GENERIC, items=due(keys=[VITALS[0]]), server_refs=server_refs)
    [step] = result.steps
    assert isinstance(step, Transaction) and step.entries[0].resource == BY_KEY[VITALS[0]]


def test_not_routed_types_are_skipped_and_references_to_them_dropped():
    target = GENERIC.model_copy(
        update={"resource_types": ("Patient", "Encounter", "EpisodeOfCare", "Observation")}
    )
    result = run(target)
    transaction = steps_of(result, Transaction)[0]
    encounter = next(e for e in transaction.entries if e.key == ENCOUNTER)
    assert "participant" not in encounter.resource  # Practitioners are not routed
    assert encounter.resource["episodeOfCare"] == [{"reference": EPISODE}]
    skips = [s for s in steps_of(result, Fallback) if s.action == "skip"]
    assert {s.key for s in skips} == {
        *PRACTITIONERS,
        "Medication/f0eed9ca-051b-5d58-a9b3-1a564ac430d4",
        PROCEDURE,
        MA1,
        MA2,
        AE1,
        AE2,
        PROVENANCE,
    }
    assert all("not routed" in s.reason for s in skips)


def test_configured_skip_instead_of_note():
    target = ORACLE.model_copy(update={"fallbacks": {"AdverseEvent": "skip"}})
    result = run(target, patient_ref="Patient/oP1")
    for key in (AE1, AE2):
        step = result.step_for(key)
        assert isinstance(step, Fallback) and step.action == "skip" and step.note is None


def test_plan_inputs_are_checked():
    with pytest.raises(ValueError, match="due twice"):
        plan(
            GENERIC,
            load_profile("generic-r4"),
            due() + due(keys=[PATIENT]),
            server_refs={},
            patient_ref=None,
            encounter_refs={},
        )
    other = copy.deepcopy(BY_KEY[VITALS[0]])
    other["id"] = "0f0f0f0f-0000-4000-8000-000000000000"
    other["subject"] = {"reference": "Patient/someone-else"}
    with pytest.raises(ValueError, match="one patient"):
        plan(
            GENERIC,
            load_profile("generic-r4"),
            [*due(), Due(other, "1")],
            server_refs={},
            patient_ref=None,
            encounter_refs={},
        )


def test_plans_are_deterministic_and_inputs_untouched():
    before = copy.deepcopy(RESOURCES)
    first = run(ORACLE, patient_ref="Patient/oP1")
    second = run(ORACLE, patient_ref="Patient/oP1")
    assert first == second
    assert before == RESOURCES


# --------------------------------------------------------------------------- notes


def test_adverse_event_note_is_valid_and_readable():
    ae = BY_KEY[AE1]
    note = note_for(ae, patient_ref="Patient/oP1", encounter_ref="Encounter/oE1", lookup=BY_KEY)
    assert VALIDATOR.validate(note) == []
    assert note["status"] == "current"
    assert note["type"] == {"text": "Adverse event note"}  # text only: no LOINC claimed
    assert note["identifier"] == [
        {"system": "urn:fhirbridge:clinic-a:adverse-event#note", "value": "ae-1"}
    ]
    assert note["subject"] == {"reference": "Patient/oP1"}
    assert note["date"] == "2026-03-02T10:05:00-05:00"
    assert note["context"] == {"encounter": [{"reference": "Encounter/oE1"}]}
    attachment = note["content"][0]["attachment"]
    assert attachment["contentType"] == "text/plain; charset=utf-8"
    text = note_text(note)
    for expected in (
        "Event: Nausea",
        "Onset: 2026-03-02T10:05:00-05:00",
        "Severity: Mild",
        "Seriousness: Non-serious",
        "Outcome: Resolved",
        "Suspect dose: MDMA (midomafetamine), investigational, 80 mg, Oral route, "
        "2026-03-02T09:32:00-05:00",
        "Probably/Likely",
    ):
        assert expected in text, text
    assert note["meta"]["security"][0]["code"] == "R"
    assert note["securityLabel"] == [{"coding": [ae["meta"]["security"][0]]}]


def test_medication_administration_note_is_valid_and_readable():
    note = note_for(BY_KEY[MA2], patient_ref="Patient/x", lookup=BY_KEY)
    assert VALIDATOR.validate(note) == []
    text = note_text(note)
    for expected in (
        "Substance: MDMA (midomafetamine), investigational",
        "Dose: 40 mg",
        "Route: Oral route",
        "Time: 2026-03-02T11:17:00-05:00",
        "Status: completed",
    ):
        assert expected in text, text
    assert "context" not in note


@pytest.mark.parametrize("key", sorted(BY_KEY))
def test_a_note_for_every_produced_record_is_valid(key):
    note = note_for(
        BY_KEY[key], patient_ref="Patient/p", encounter_ref="Encounter/e", lookup=BY_KEY
    )
    assert VALIDATOR.validate(note) == []
    assert note_text(note)


def test_notes_are_put_to_a_deterministic_id_where_update_create_exists():
    caps = replace(
        load_profile("generic-r4"),
        types=MappingProxyType({"AdverseEvent": TypeCaps(read=True)}),
    )
    result = run(GENERIC, caps)
    step = result.step_for(AE1)
    assert isinstance(step, Fallback) and isinstance(step.write, Single)
    assert step.write.method == "PUT" and step.note is not None
    assert step.write.url == f"DocumentReference/{step.note['id']}"
    again = run(GENERIC, caps).step_for(AE1)
    assert isinstance(again, Fallback) and again.note == step.note


# --------------------------------------------------------------------------- rendering


def test_render_lists_steps_without_patient_data():
    outputs = [
        render(run(GENERIC)),
        render(run(EPIC)),
        render(run(EPIC, patient_ref=EPIC_PATIENT, encounter_refs={ENCOUNTER: EPIC_ENCOUNTER})),
        render(run(ORACLE, patient_ref="Patient/oP1")),
        render(run(GENERIC, _conditional_generic())),
    ]
    for text in outputs:
        for phi in (MRN, "Synthetic-Okafor", "Adaeze", "p-0001", "ae-1", "1984-07-19", "Nausea"):
            assert phi not in text
    assert outputs[0].splitlines()[0] == (
        "target research-store (profile generic-r4): 1 steps, 27 writes — 1 transaction"
    )
    assert "no matching encounter on target" in render(run(EPIC, patient_ref=EPIC_PATIENT))


# --------------------------------------------------------------------------- property


def _random_capabilities(rng: random.Random) -> Capabilities:
    types = {}
    for rtype in [*{r["resourceType"] for r in RESOURCES}, "DocumentReference"]:
        types[rtype] = TypeCaps(*(rng.random() < 0.5 for _ in range(6)))
    return Capabilities(
        name="random",
        transaction=rng.random() < 0.4,
        batch=rng.random() < 0.5,
        versioned_update=rng.random() < 0.5,
        requires_existing_encounter=rng.random() < 0.3,
        types=MappingProxyType(types),
        unlisted=TypeCaps(),
    )


def _random_case(rng: random.Random, target: Target, caps: Capabilities) -> dict[str, Any]:
    keys = [k for k in BY_KEY if rng.random() < 0.7] or [PATIENT]
    server_refs: dict[str, str] = {}
    items: list[Due] = []
    for key in keys:
        ledger = None
        version = "1"
        r = rng.random()
        if r < 0.25:
            ledger = Ledger(f"s{len(items)}", str(rng.randint(1, 5)), "1", "sent")
            server_refs[key] = f"{key.split('/')[0]}/s{len(items)}"
            version = rng.choice(["1", "2"])
        elif r < 0.3:
            ledger = Ledger(f"d{len(items)}", "1", "1", "fallback")
            server_refs[key] = f"DocumentReference/d{len(items)}"
            version = "2"
        items.append(Due(copy.deepcopy(BY_KEY[key]), version, ledger))
    for key in BY_KEY:  # some of what is not due was delivered earlier
        if key not in keys and rng.random() < 0.5:
            server_refs[key] = f"{key.split('/')[0]}/x{len(server_refs)}"
    return {
        "items": items,
        "server_refs": server_refs,
        "patient_ref": rng.choice([None, "Patient/hp1"]),
        "encounter_refs": rng.choice([{}, {ENCOUNTER: "Encounter/he1"}]),
    }


def _check_writes_allowed(result: Plan, caps: Capabilities) -> None:
    for step in result.steps:
        if isinstance(step, Transaction):
            assert caps.transaction
        if isinstance(step, Batch):
            assert caps.batch and not caps.transaction
        if isinstance(step, SearchThenCreate):
            tc = caps.of(step.type)
            assert tc.search_identifier and tc.create
            assert step.type != "AdverseEvent"
        if isinstance(step, MatchPatient) and step.create is not None:
            assert caps.of("Patient").writable
    for write in result.writes():
        tc = caps.of(write.resource_type)
        if write.via in ("update", "note-update"):
            assert write.method == "PUT" and tc.update, write
        elif write.method == "PUT":
            assert tc.update_create, write  # PUT of something new: update-as-create only
        else:
            assert tc.create, write
        if write.if_none_exist is not None:
            assert tc.conditional_create, write
            assert write.resource_type != "AdverseEvent"
        if write.if_match is not None:
            assert caps.versioned_update


def _random_target(rng: random.Random, base: Target) -> Target:
    types = tuple(t for t in base.resource_types if rng.random() < 0.8) or ("Patient",)
    fallbacks = {t: rng.choice(["skip", "note"]) for t in types if t in NOTE_BY_DEFAULT}
    matching = rng.random() < 0.6
    return base.model_copy(
        update={
            "resource_types": types,
            "fallbacks": {t: a for t, a in fallbacks.items() if rng.random() < 0.3},
            "batch_size": rng.randint(1, 30),
            "patient_identifier": EPIC.patient_identifier if matching else None,
            "create_patient": rng.random() < 0.5 if matching else True,
        }
    )


def _check_references(result: Plan) -> None:
    for step in result.steps:
        if isinstance(step, Batch):  # a batch resolves no urn:uuid
            for entry in step.entries:
                assert not any(r.startswith("urn:uuid:") for r in refs_in(entry.resource))
        if isinstance(step, Transaction):
            full_urls = {e.full_url for e in step.entries}
            for entry in step.entries:
                for ref in refs_in(entry.resource):
                    assert not ref.startswith("urn:uuid:") or ref in full_urls


@pytest.mark.parametrize("profile", ["generic-r4", "epic", "oracle-health", "random"])
def test_property_no_write_the_target_cannot_accept(profile):
    rng = random.Random(f"sync-planner-{profile}")
    targets = {"generic-r4": GENERIC, "epic": EPIC, "oracle-health": ORACLE, "random": GENERIC}
    for _ in range(60):
        caps = _random_capabilities(rng) if profile == "random" else load_profile(profile)
        target = targets[profile]
        if profile == "random" or rng.random() < 0.3:
            target = _random_target(rng, target)
        case = _random_case(rng, target, caps)
        result = run(target, caps, case["items"], **{k: v for k, v in case.items() if k != "items"})
        _check_writes_allowed(result, caps)
        _check_references(result)
        due_keys = [d.key for d in case["items"]]
        keys = settled(result)
        assert len(keys) == len(set(keys))  # one step per resource
        assert set(keys) <= set(due_keys)
        for d in case["items"]:  # everything not already sent at this version gets a step
            done = d.ledger is not None and d.ledger.sent_version == d.version
            assert (d.key in keys) != done, d.key
        for step in result.steps:  # a ready write holds no reference to our own POSTed ids
            if isinstance(step, Batch):
                assert not step.awaiting or step.level > 0


def test_auto_profile_from_sekmet_like_metadata_plans_one_transaction():
    cs = {
        "resourceType": "CapabilityStatement",
        "rest": [
            {
                "mode": "server",
                "interaction": [{"code": "transaction"}, {"code": "batch"}],
                "resource": [
                    {
                        "type": t,
                        "interaction": [
                            {"code": c} for c in ("read", "search-type", "create", "update")
                        ],
                        "updateCreate": True,
                        "conditionalCreate": True,
                        "versioning": "versioned-update",
                    }
                    # AdverseEvent is not listed, as on sekmet-fhir
                    for t in sorted({r["resourceType"] for r in RESOURCES} - {"AdverseEvent"})
                ],
            }
        ],
    }
    target = GENERIC.model_copy(update={"profile": "auto"})
    result = run(target, from_capability_statement(cs))
    [step] = result.steps
    assert isinstance(step, Transaction) and len(step.entries) == 27
    assert all(e.method == "PUT" for e in step.entries)
