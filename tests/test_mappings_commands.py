"""`fhirbridge mappings validate` and `mappings test`: what an integrator sees on a broken pack."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from fhirbridge.cli import main

SHIPPED = Path(__file__).resolve().parents[1] / "mappings"


@pytest.fixture
def pack(tmp_path: Path) -> Path:
    target = tmp_path / "pack"
    shutil.copytree(SHIPPED, target, ignore=shutil.ignore_patterns("examples"))
    return target


def _edit(path: Path, old: str, new: str) -> int:
    """Replace the first `old` in the file; return the 1-based line it was on."""
    text = path.read_text()
    assert old in text, old
    line = text[: text.index(old)].count("\n") + 1
    path.write_text(text.replace(old, new, 1))
    return line


def _run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def test_shipped_pack_is_clean() -> None:
    result = _run("mappings", "validate", str(SHIPPED))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().endswith(": OK")
    assert result.stderr == ""  # no errors, and every source field is read by some rule


def test_misspelled_source_field(pack: Path) -> None:
    rule = pack / "rules/vital.Observation.yaml"
    line = _edit(rule, "value: $.heartRate,", "value: $.hartRate,")
    result = _run("mappings", "validate", str(pack))
    assert result.exit_code == 1
    assert (
        f"error: rules/vital.Observation.yaml:{line}: rule vital-heart-rate: "
        "/rules/0/template/valueQuantity/value: source field 'hartRate' does not exist in "
        "source-v1.schema.json at vitals[*]"
    ) in result.stderr
    # heartRate is now read only by `when`, so it is not reported as unread
    assert "1 error(s)" in result.stdout


def test_nonexistent_fhir_path(pack: Path) -> None:
    rule = pack / "rules/session.Procedure.yaml"
    line = _edit(rule, "performedPeriod:", "performedPeriodd:")
    result = _run("mappings", "validate", str(pack))
    assert result.exit_code == 1
    assert (
        f"rules/session.Procedure.yaml:{line}: rule session-procedure: "
        "/rules/0/template/performedPeriodd: Procedure has no element 'performedPeriodd' in "
        "FHIR R4 (did you mean 'performedPeriod'?)"
    ) in result.stderr


def test_nested_fhir_path_and_cardinality(pack: Path) -> None:
    rule = pack / "rules/dose.MedicationAdministration.yaml"
    _edit(rule, "          unit: mg\n", "          units: mg\n")
    _edit(
        rule,
        "      partOf:\n        - {$ref: session-procedure, id: $.sessionId}",
        "      partOf: {$ref: session-procedure, id: $.sessionId}\n"
        "      context:\n        - {$ref: session, id: $.sessionId}",
    )
    result = _run("mappings", "validate", str(pack))
    assert "Quantity has no element 'units' in FHIR R4 (did you mean 'unit'?)" in result.stderr
    assert (
        "/rules/0/template/context: Reference holds one value (0..1), not a list" in result.stderr
    )


def test_unknown_code_system_in_a_template_and_in_a_table(pack: Path) -> None:
    line = _edit(
        pack / "rules/vital.Observation.yaml",
        "system: $const.loinc, code: 8867-4",
        "system: http://loinc.example, code: 8867-4",
    )
    table_line = _edit(
        pack / "terminology/route.yaml",
        "{system: http://snomed.info/sct,",
        "{system: urn:my-clinic:routes,",
    )
    result = _run("mappings", "validate", str(pack))
    assert result.exit_code == 1
    assert (
        f"rules/vital.Observation.yaml:{line}: rule vital-heart-rate: "
        "/rules/0/template/code/coding/0/system: unknown code system "
        "'http://loinc.example'"
    ) in result.stderr
    assert (
        f"terminology/route.yaml:{table_line}: /rows/oral/system: unknown code system "
        "'urn:my-clinic:routes'"
    ) in result.stderr
    # a local system declared in pack.yaml is fine
    _edit(
        pack / "pack.yaml",
        '  - "urn:fhirbridge:CodeSystem"',
        '  - "urn:fhirbridge:CodeSystem"\n  - "urn:my-clinic:routes"',
    )
    assert "urn:my-clinic:routes" not in _run("mappings", "validate", str(pack)).stderr


def test_malformed_yaml(pack: Path) -> None:
    (pack / "rules/patient.Patient.yaml").write_text("rules:\n  - name: patient\n    resource: [\n")
    result = _run("mappings", "validate", str(pack))
    assert result.exit_code == 2
    assert "rules/patient.Patient.yaml:4: /: malformed YAML" in result.stderr


def test_coverage_reports_unread_fields(pack: Path) -> None:
    _edit(
        pack / "rules/session.Encounter.yaml",
        "      location:\n        - $if: $.location\n          then:\n"
        "            location: {display: $.location}\n",
        "",
    )
    result = _run("mappings", "validate", str(pack))
    assert result.exit_code == 0
    assert "coverage: source field sessions[*].location is read by no rule" in result.stderr


def test_mappings_test_passes_fails_with_a_diff_and_updates(pack: Path) -> None:
    ok = _run("mappings", "test", str(pack))
    assert ok.exit_code == 0 and "medicine-session: ok" in ok.stdout
    _edit(
        pack / "terminology/adverse-event-terms.yaml",
        "display: Nausea",
        "display: Nausea (finding)",
    )
    failed = _run("mappings", "test", str(pack))
    assert failed.exit_code == 1
    assert "medicine-session: FAILED" in failed.stdout
    assert '-        "display": "Nausea"\n+        "display": "Nausea (finding)"' in failed.stdout
    assert "medicine-session.out.json AdverseEvent/" in failed.stdout
    updated = _run("mappings", "test", "--update", str(pack))
    assert updated.exit_code == 0 and "medicine-session: updated" in updated.stdout
    assert _run("mappings", "test", str(pack)).exit_code == 0


def test_mappings_test_reports_invalid_fhir_from_a_rule(pack: Path) -> None:
    _edit(pack / "rules/vital.Observation.yaml", "    status: final", "    status: finished")
    result = _run("mappings", "test", str(pack))
    assert result.exit_code == 1
    assert "rule 'vital-heart-rate' (record $.vitals[0]) produced invalid FHIR" in result.stdout
    assert "Observation.status" in result.stdout


def test_mappings_test_bad_input_fixture(pack: Path) -> None:
    fixture = pack / "fixtures/medicine-session.in.json"
    doc = json.loads(fixture.read_text())
    doc["doses"][0]["sessionId"] = "nope"
    fixture.write_text(json.dumps(doc))
    result = _run("mappings", "test", str(pack))
    assert result.exit_code == 1
    assert "doses[0].sessionId: refers to an id that is not in sessions[*].id" in result.stdout
