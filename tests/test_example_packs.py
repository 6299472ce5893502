"""Example mapping packs (mappings/examples/*/pack.yaml): custom packs for other source shapes.

For every example pack: each fixture maps to exactly its reviewed Bundle, every recorded resource
passes the R4B models and the official R4 JSON Schema, and the pack passes the static checks of
`fhirbridge mappings validate`. For the REDCap pack, its promise: the same FHIR as the source
format v1 pack for the same facts, and the service runs on it through FHIRBRIDGE_MAPPINGS_DIR.

Re-record after review: FHIRBRIDGE_UPDATE_GOLDEN=1 pytest tests/test_example_packs.py
(or `fhirbridge mappings test mappings/examples/<pack> --update`).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest

from fhirbridge import create_app
from fhirbridge.fhir.validate import OutputValidator
from fhirbridge.goldens import GOLDEN_NOW, expected_path, fixture_cases, run_case
from fhirbridge.mapping.check import check_pack
from fhirbridge.mapping.engine import MapResult
from fhirbridge.mapping.pack import MappingPack, load_pack
from fhirbridge.pipeline import summary, transform
from fhirbridge.settings import Settings
from fhirbridge.validation import SubmissionValidator

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "mappings" / "examples"
PACKS: dict[str, MappingPack] = {
    p.parent.name: load_pack(p.parent) for p in sorted(EXAMPLES.glob("*/pack.yaml"))
}
CASES = [(name, case) for name, pack in PACKS.items() for case in fixture_cases(pack)]
CASE_IDS = [f"{name}/{case.name.removesuffix('.in.json')}" for name, case in CASES]
VALIDATOR = OutputValidator()

V1 = load_pack(ROOT / "mappings")
REDCAP = PACKS["redcap"]
V1_DOC = ROOT / "mappings" / "fixtures" / "medicine-session.in.json"
REDCAP_DOC = EXAMPLES / "redcap" / "fixtures" / "medicine-session.in.json"


def _load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _transform(pack: MappingPack, doc: Any) -> MapResult:
    return transform(
        doc,
        pack=pack,
        input_validator=SubmissionValidator(pack.source_schema, pack.integrity),
        output_validator=VALIDATOR,
        now=GOLDEN_NOW,
    )


def _body(response: Any) -> Any:
    data = response.get_json(force=True)
    assert data is not None
    return data


def _keyed(result: MapResult) -> dict[str, dict[str, Any]]:
    return {f"{r['resourceType']}/{r['id']}": r for r in result.resources}


# ---------------------------------------------------------------- every example pack


def test_every_example_pack_has_fixtures() -> None:
    assert "redcap" in PACKS
    for name, pack in PACKS.items():
        assert fixture_cases(pack), f"mappings/examples/{name} has no fixtures/*.in.json"


@pytest.mark.parametrize(("name", "case"), CASES, ids=CASE_IDS)
def test_fixture_maps_to_its_golden_bundle(name: str, case: Path) -> None:
    update = os.environ.get("FHIRBRIDGE_UPDATE_GOLDEN") == "1"
    result = run_case(PACKS[name], case, update=update, validator=VALIDATOR)
    assert result.passed, result.diff or "\n".join(result.problems)


@pytest.mark.parametrize(("name", "case"), CASES, ids=CASE_IDS)
def test_every_golden_resource_is_valid_r4(name: str, case: Path) -> None:
    bundle = _load(expected_path(case))
    assert VALIDATOR.validate(bundle) == []
    for entry in bundle["entry"]:
        resource = entry["resource"]
        issues = VALIDATOR.validate(resource)
        assert issues == [], f"{resource['resourceType']}/{resource['id']}: {issues}"


@pytest.mark.parametrize("name", list(PACKS))
def test_example_pack_passes_the_static_checks(name: str) -> None:
    report = check_pack(PACKS[name])
    assert report.errors == [], "\n".join(str(f) for f in report.errors)


def test_the_shipped_pack_loads_nothing_from_the_examples() -> None:
    assert V1.directory == (ROOT / "mappings").resolve()
    assert not [f for f in V1.files if f.startswith("examples/")]
    assert not [t for t in V1.tables.values() if t.file.startswith("examples/")]


# ---------------------------------------------------------------- REDCap: same FHIR as v1


def test_redcap_copies_of_v1_tables_are_unchanged() -> None:
    """The FHIR-side tables are copies of the v1 pack's: same rows, same code systems."""
    copied = [t for t in REDCAP.tables.values() if not t.name.startswith("redcap-")]
    assert copied
    for table in copied:
        original = V1.tables[table.name]
        assert table.file == original.file, table.name
        assert (table.rows, table.source_system, table.target_system) == (
            original.rows,
            original.source_system,
            original.target_system,
        ), table.name


def test_redcap_export_gives_the_same_fhir_as_v1_for_the_same_facts() -> None:
    """The REDCap fixture carries the facts of mappings/fixtures/medicine-session.in.json except
    the CAPS-5 assessment (no assessment form in the REDCap project). Every resource both packs
    make is identical, byte for byte as JSON and in the same order: 25 of them (Patient,
    2 Practitioners, EpisodeOfCare, Encounter, Procedure, Medication, 2 MedicationAdministrations,
    14 vital-sign Observations, 2 AdverseEvents).

    Out of scope, by design:
    - the CAPS-5 survey Observation: v1 only (the export has no assessments);
    - the Provenance: its id and source entity are the content hash of the submitted document,
      which differs between the two documents, and its targets list what each run produced
      (v1's also lists the CAPS-5 Observation). Everything else in it is the same.
    The EpisodeOfCare is in scope: its period starts at the earliest session start of the
    submission, and both documents hold the same single session.
    """
    assert REDCAP.identity.namespace == V1.identity.namespace
    assert REDCAP.identity.system_template == V1.identity.system_template
    v1 = _transform(V1, _load(V1_DOC))
    rc = _transform(REDCAP, _load(REDCAP_DOC))
    assert (rc.source, rc.patient_id) == (v1.source, v1.patient_id) == ("clinic-a", "p-0001")

    a, b = _keyed(v1), _keyed(rc)
    source = v1.source
    caps5 = f"Observation/{V1.identity.resource_id(source, 'assessment', 'a-1')}"
    v1_provenance = f"Provenance/{V1.identity.resource_id(source, 'provenance', v1.content_hash)}"
    rc_provenance = f"Provenance/{V1.identity.resource_id(source, 'provenance', rc.content_hash)}"
    assert v1.content_hash != rc.content_hash
    assert [k for k in a if k not in b] == [caps5, v1_provenance]
    assert [k for k in b if k not in a] == [rc_provenance]

    shared_v1 = [json.dumps(r) for k, r in a.items() if k in b]
    shared_rc = [json.dumps(r) for k, r in b.items() if k in a]
    assert len(shared_v1) == 25
    assert shared_rc == shared_v1
    assert [r["resourceType"] for k, r in b.items() if k in a].count("Observation") == 14

    # Provenance: the same but for what names the submitted document and what it produced.
    p_v1, p_rc = copy.deepcopy(a[v1_provenance]), copy.deepcopy(b[rc_provenance])
    assert p_rc["target"] == [{"reference": k} for k in b if k != rc_provenance], (
        "the REDCap Provenance targets everything the export produced"
    )
    assert p_rc["target"] == [t for t in p_v1["target"] if t != {"reference": caps5}]
    assert p_v1["entity"][0]["what"]["identifier"]["value"] == v1.content_hash
    assert p_rc["entity"][0]["what"]["identifier"]["value"] == rc.content_hash
    for p in (p_v1, p_rc):
        del p["id"], p["target"], p["entity"][0]["what"]["identifier"]["value"]
    assert p_rc == p_v1

    # The same terms are counted as unmapped (muscle-tightness: no verified SNOMED CT code).
    assert summary(rc)["unmappedTerms"] == summary(v1)["unmappedTerms"]


# ---------------------------------------------------------------- REDCap: a strict contract


def _set(row: int, **values: Any) -> Any:
    def mutate(doc: dict[str, Any]) -> None:
        doc["records"][row].update(values)

    return mutate


def _swap_first_rows(doc: dict[str, Any]) -> None:
    doc["records"][0], doc["records"][1] = doc["records"][1], doc["records"][0]


def _second_demographics_row(doc: dict[str, Any]) -> None:
    doc["records"].append(copy.deepcopy(doc["records"][0]))


@pytest.mark.parametrize(
    ("mutate", "path"),
    [
        # a choice code not in the data dictionary
        (_set(4, vs_timepoint="7"), "records[4].vs_timepoint"),
        # REDCap exports numbers as text; text that is not a number is refused
        (_set(4, vs_hr="72 bpm"), "records[4].vs_hr"),
        (_set(4, vs_hr=72), "records[4].vs_hr"),
        # a renamed or added column: the whole row is refused, not silently unmapped
        (_set(4, vs_pulse="72"), "records[4]"),
        # another form's field on a vital-signs row
        (_set(4, dose_mg="80"), "records[4].dose_mg"),
        # a required field of the row's form left blank
        (_set(4, vs_time=""), "records[4].vs_time"),
        (_set(3, dose_given="0"), "records[3].dose_not_given_reason"),
        (_set(8, ae_term="99"), "records[8].ae_term_other"),
        # systolic without diastolic
        (_set(4, vs_dbp=""), "records[4].vs_dbp"),
        # study drug only in a medicine session event
        (_set(2, redcap_event_name="integration_1_arm_1"), "records[2].redcap_event_name"),
        # one record per export, its demographics row first
        (_set(5, record_id="p-0002"), "records[5].record_id"),
        (_swap_first_rows, "records[0].redcap_event_name"),
        (_second_demographics_row, "records[10].redcap_event_name"),
        # repeating forms need their event's therapy_session row
        (_set(4, redcap_event_name="medicine_session_2_arm_1"), "records[4].redcap_event_name"),
    ],
)
def test_redcap_schema_refuses_a_bad_export(mutate: Any, path: str) -> None:
    doc = _load(REDCAP_DOC)
    mutate(doc)
    issues = SubmissionValidator(REDCAP.source_schema, REDCAP.integrity).validate(doc)
    assert path in [e for issue in issues for e in issue.expression], issues


# ---------------------------------------------------------------- the service on a custom pack


def test_service_runs_on_the_redcap_pack_through_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FHIRBRIDGE_MAPPINGS_DIR", str(EXAMPLES / "redcap"))
    settings = Settings(database_url="sqlite://", db_auto_upgrade=True)
    assert settings.mappings_dir == EXAMPLES / "redcap"
    app = create_app(settings)
    doc = _load(REDCAP_DOC)
    try:
        with app.test_client() as client:
            first = client.post("/api/v1/submissions", json=doc)
            body = _body(first)
            assert first.status_code == 201, body
            assert body["outcome"] == "accepted"
            assert len(body["resources"]) == 26
            assert body["unmappedTerms"] == [{"table": "adverse-event-terms", "count": 1}]
            records = {r["record"]: r for r in body["records"]}
            assert [p["resourceType"] for p in records["$.records[6]"]["produced"]] == [
                "Observation"
            ] * 5

            again = client.post("/api/v1/submissions", json=doc)
            assert again.status_code == 200
            assert _body(again)["outcome"] == "unchanged"

            # The stored Patient is the one the v1 pack makes from the same facts.
            v1_patient = _transform(V1, _load(V1_DOC)).resources[0]
            read = client.get(f"/fhir/Patient/{v1_patient['id']}")
            assert read.status_code == 200
            stored = _body(read)
            assert stored["meta"]["security"] == v1_patient["meta"]["security"]
            assert {k: v for k, v in stored.items() if k != "meta"} == {
                k: v for k, v in v1_patient.items() if k != "meta"
            }

            bad = copy.deepcopy(doc)
            bad["records"][4]["vs_timepoint"] = "7"
            refused = client.post("/api/v1/submissions", json=bad)
            assert refused.status_code == 422
            outcome = _body(refused)
            assert outcome["resourceType"] == "OperationOutcome"
            assert ["records[4].vs_timepoint"] in [i.get("expression") for i in outcome["issue"]]
    finally:
        app.extensions["fhirbridge"].store.close()
