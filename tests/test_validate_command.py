"""`fhirbridge validate` and the checker behind it: resources, Bundles, NDJSON, line numbers."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from fhirbridge.cli import main
from fhirbridge.fhir.checker import (
    check_document,
    check_ndjson,
    count_resources,
    locate_lines,
)
from fhirbridge.fhir.validate import OutputValidator

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "tests" / "data" / "r4-examples"
GOLDEN = ROOT / "mappings" / "fixtures" / "medicine-session.out.json"
SENTINEL = "SENTINEL-PHI-Jane-Doe-1970"
VALIDATOR = OutputValidator()


def run(*args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(main, ["validate", *args], input=stdin)


def golden() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(GOLDEN.read_bytes())
    return data


def heart_rate(rid: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((EXAMPLES / "Observation-heart-rate.json").read_bytes())
    data["id"] = rid
    del data["text"]
    return data


def test_official_r4_examples_pass() -> None:
    files = sorted(str(p) for p in EXAMPLES.glob("*.json"))
    result = run(*files)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{len(files)} resources, 0 issues\n"


def test_our_golden_transaction_bundle_passes() -> None:
    result = run(str(GOLDEN))
    assert result.exit_code == 0, result.output
    assert result.stdout == "28 resources, 0 issues\n"  # the Bundle and its 27 entries
    assert count_resources(golden()) == 28


def test_bundle_with_one_bad_entry_names_that_entry_and_its_line(tmp_path: Path) -> None:
    bundle = golden()
    index = next(
        i for i, e in enumerate(bundle["entry"]) if "bodytemp" in str(e["resource"].get("meta"))
    )
    bundle["entry"][index]["resource"]["valueQuantity"]["code"] = SENTINEL
    path = tmp_path / "bundle.json"
    text = json.dumps(bundle, indent=2)
    path.write_text(text)
    sentinel_line = next(n for n, t in enumerate(text.splitlines(), 1) if SENTINEL in t)

    result = run(str(path))
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        f"{path}:{sentinel_line}: error Bundle.entry[{index}].resource.valueQuantity.code: "
        "must be the UCUM code Cel or [degF] "
        "(body temperature profile, http://hl7.org/fhir/StructureDefinition/bodytemp)",
        "28 resources, 1 issues",
    ]
    assert SENTINEL not in result.output


def test_bundle_locations_shell_entries_and_references() -> None:
    bundle = golden()
    bundle["type"] = "not-a-bundle-type"  # the Bundle itself
    patient = bundle["entry"][0]
    patient["resource"]["gender"] = "unknown-gender"  # an entry, structurally
    observations = [e for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"]
    # a urn:uuid reference is resolved through the entries' fullUrls
    observations[0]["resource"]["subject"] = {"reference": bundle["entry"][1]["fullUrl"]}
    observations[1]["resource"]["subject"] = {"reference": patient["fullUrl"]}
    first = bundle["entry"].index(observations[0])
    issues = check_document(bundle, validator=VALIDATOR)
    assert [(i.expression[0], i.code) for i in issues] == [
        ("Bundle.entry[0].resource.gender", "code-invalid"),
        (f"Bundle.entry[{first}].resource.subject.reference", "value"),
        ("Bundle.type", "code-invalid"),
    ]


def test_nested_bundle_entries_are_rebased() -> None:
    inner = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": heart_rate("a")}, {"resource": heart_rate("b") | {"status": 1}}],
    }
    outer = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": inner}]}
    issues = check_document(outer, validator=VALIDATOR)
    assert {i.expression[0] for i in issues} == {
        "Bundle.entry[0].resource.entry[1].resource.status"
    }
    assert count_resources(outer) == 4
    # structural problems of non-object entries are still the Bundle's
    odd = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": [1]}]}
    assert [i.expression[0] for i in check_document(odd, validator=VALIDATOR)] == [
        "Bundle.entry[0].resource"
    ]


def ndjson_lines() -> list[str]:
    """Five lines: 3 is invalid, 4 is not JSON, 5 is invalid too."""
    lines = [json.dumps(heart_rate(f"hr{n}")) for n in range(1, 6)]
    bad = heart_rate("hr3")
    bad["valueQuantity"]["code"] = SENTINEL
    bad["subject"] = {"display": SENTINEL}
    lines[2] = json.dumps(bad)
    lines[3] = '{"resourceType": "Observation", "note": "' + SENTINEL
    lines[4] = json.dumps(heart_rate("hr5") | {"status": SENTINEL})
    return lines


def test_ndjson_bad_line_3_and_the_others_still_checked(tmp_path: Path) -> None:
    path = tmp_path / "export.ndjson"
    path.write_text("\n".join(ndjson_lines()) + "\n")
    result = run(str(path))
    column = len('{"resourceType": "Observation", "note": "' + SENTINEL) + 1
    assert result.stdout.splitlines() == [
        f"{path}:3: error Observation.valueQuantity.code: must be the UCUM code /min "
        "(heart rate profile, http://hl7.org/fhir/StructureDefinition/heartrate)",
        f"{path}:4: fatal -: malformed JSON at column {column}",
        f"{path}:5: error Observation.status: code is not in the required value set (registered, "
        "preliminary, final, amended, corrected, cancelled, entered-in-error, unknown)",
        "4 resources, 3 issues",
    ]
    assert result.exit_code == 2  # a malformed line makes the input malformed
    assert SENTINEL not in result.output


def test_ndjson_detected_without_extension_and_from_stdin(tmp_path: Path) -> None:
    lines = ndjson_lines()
    del lines[3]  # no malformed line: exit status 1 (errors)
    path = tmp_path / "export.json"
    path.write_text("\n\n" + "\n".join(lines) + "\n")  # leading blank lines keep numbering
    by_file = run(str(path))
    assert by_file.exit_code == 1
    assert f"{path}:5: error Observation.valueQuantity.code" in by_file.stdout
    assert f"{path}:6: error Observation.status" in by_file.stdout
    by_stdin = run("-", stdin="\n".join(lines))
    assert by_stdin.exit_code == 1
    assert "-:3: error Observation.valueQuantity.code" in by_stdin.stdout
    assert by_stdin.stdout.endswith("4 resources, 2 issues\n")


def test_ndjson_is_streamed_line_by_line() -> None:
    consumed: list[int] = []

    def lines() -> Iterator[bytes]:
        for n in range(1, 4):
            consumed.append(n)
            yield json.dumps(heart_rate(f"hr{n}")).encode() + b"\n"

    results = check_ndjson(lines(), validator=VALIDATOR)
    first = next(results)
    assert first.line == 1 and consumed == [1]  # checked before line 2 was read
    assert [r.line for r in results] == [2, 3]


def test_malformed_json_reports_line_and_column_never_content(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{\n  "resourceType": "Patient",\n  "name": [' + SENTINEL + "]\n}\n")
    result = run(str(path))
    assert result.exit_code == 2
    assert (
        result.stdout.splitlines()[0] == f"{path}:3: fatal -: malformed JSON at line 3, column 12"
    )
    assert SENTINEL not in result.output


def test_unreadable_and_empty_files_exit_2_and_the_rest_is_checked(tmp_path: Path) -> None:
    empty = tmp_path / "empty.json"
    empty.write_text("\n \n")
    good = EXAMPLES / "Patient-example.json"
    result = run(str(tmp_path / "missing.json"), str(tmp_path), str(empty), str(good))
    assert result.exit_code == 2
    assert f"{tmp_path / 'missing.json'}: cannot read: No such file or directory" in result.stderr
    assert f"{tmp_path}: cannot read:" in result.stderr
    assert f"{empty}:1: fatal -: empty input: no JSON document" in result.stdout
    assert result.stdout.endswith("1 resources, 1 issues\n")


def test_warnings_alone_exit_0(tmp_path: Path) -> None:
    panel = heart_rate("panel")
    panel["meta"] = {"profile": ["http://hl7.org/fhir/StructureDefinition/vitalspanel"]}
    panel["code"] = {"text": "vitals"}
    del panel["valueQuantity"]
    panel["hasMember"] = [{"reference": "Observation/hr1"}]
    path = tmp_path / "panel.json"
    path.write_text(json.dumps(panel, indent=1))
    result = run(str(path))
    assert result.exit_code == 0, result.output
    assert "warning Observation.code: must contain the coding http://loinc.org#85353-1" in (
        result.stdout
    )


def test_not_a_resource() -> None:
    result = run("-", stdin="[1, 2]\n")
    assert result.exit_code == 1
    assert result.stdout.splitlines()[0] == "-:1: error -: a resource must be a JSON object"


@pytest.mark.parametrize(
    ("expression", "line"),
    [
        ("Bundle", 1),
        ("Bundle.type", 2),
        ("Bundle.entry[1].resource", 6),
        ("Bundle.entry[1].resource.status", 6),  # missing: the object that lacks it
        ("Bundle.entry[1].resource.code.coding[0].code", 9),
        ("Bundle.entry[0].resource.id", 4),
    ],
)
def test_locate_lines(expression: str, line: int) -> None:
    text = (
        '{"resourceType": "Bundle",\n'
        ' "type": "collection", "entry": [\n'
        '  {"resource": {"resourceType": "Patient",\n'
        '                "id": "p", "x": [], "y": {}}},\n'
        '  {"fullUrl": "urn:uuid:1", "resource":\n'
        "   {\n"
        '    "resourceType": "Observation", "code": {\n'
        '      "coding": [\n'
        '        {"system": "http://loinc.org", "code": "8867-4"}]}}}]}\n'
    )
    json.loads(text)  # the fixture itself is valid JSON
    assert locate_lines(text.encode(), [expression]) == {expression: line}


def test_bundle_entry_mutation_does_not_leak_into_input() -> None:
    bundle = golden()
    before = copy.deepcopy(bundle)
    check_document(bundle, validator=VALIDATOR)
    assert bundle == before
