"""Loading mapping packs: every problem is reported with file, JSON pointer and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from fhirbridge.errors import MappingConfigError
from fhirbridge.mapping.pack import load_pack
from tests.unit.packs import patient_rule, write_pack

SHIPPED = Path(__file__).resolve().parents[2] / "mappings"


def _problems(root: Path) -> list[str]:
    with pytest.raises(MappingConfigError) as err:
        load_pack(root)
    return [str(p) for p in err.value.problems]


def test_shipped_pack_loads() -> None:
    pack = load_pack(SHIPPED)
    assert pack.name == "fhirbridge-source-v1"
    assert {r.resource for r in pack.rules} >= {
        "Patient",
        "Practitioner",
        "EpisodeOfCare",
        "Encounter",
        "Procedure",
        "Medication",
        "MedicationAdministration",
        "Observation",
        "AdverseEvent",
        "Provenance",
    }


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        # misspelled source variable
        (
            {"gender": "$sumbission.source"},
            "r.yaml:9: /rules/0/template/gender: unknown variable $sumbission",
        ),
        # unknown operator
        ({"gender": {"$lookpu": "t", "key": "$.id"}}, "unknown operator $lookpu"),
        # unknown table
        ({"gender": {"$lookup": "nope", "key": "$.id"}}, "unknown table 'nope'"),
        # $ref to a kind no rule makes
        (
            {"link": [{"other": {"$ref": "ghost", "id": "$.id"}}]},
            "$ref names unknown identity kind 'ghost'",
        ),
        # an operator missing its required option
        ({"gender": {"$lookup": "t"}}, "$lookup needs `key`"),
        # an operator with an option it does not take
        ({"gender": {"$if": "$.id", "then": 1, "otherwise": 2}}, "$if does not take `otherwise`"),
        # a malformed path
        ({"gender": "$.a..b"}, "not a valid path expression"),
        # the engine owns id
        ({"id": "x"}, "`id` is set by the engine"),
        # an unknown constant
        ({"gender": "$const.nope"}, "unknown constant"),
    ],
)
def test_broken_rules_name_file_line_and_pointer(
    tmp_path: Path, template: dict[str, object], expected: str
) -> None:
    root = write_pack(tmp_path, [patient_rule(template)], {"t": {"a": "b"}})
    problems = _problems(root)
    assert any(expected in p for p in problems), problems
    assert all(p.startswith("rules/r.yaml:") for p in problems), problems


def test_rule_file_schema_errors_name_the_key(tmp_path: Path) -> None:
    rule = patient_rule({"active": True})
    rule["for_eahc"] = rule.pop("for_each")
    problems = _problems(write_pack(tmp_path, [rule]))
    assert problems == ["rules/r.yaml:2: /rules/0: unknown key: 'for_eahc' was unexpected"]


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    root = write_pack(tmp_path, "rules:\n  - name: a\n    template: {unclosed\n")
    (problem,) = _problems(root)
    assert problem.startswith("rules/r.yaml:") and "malformed YAML" in problem


def test_missing_rule_file_and_table_errors(tmp_path: Path) -> None:
    root = write_pack(
        tmp_path,
        [patient_rule({"active": True})],
        manifest={"rules": ["rules/r.yaml", "rules/missing.yaml"]},
    )
    (tmp_path / "terminology" / "bad.yaml").write_text("table: Bad Name\nrows: {}\n")
    problems = _problems(root)
    assert any(p.startswith("rules/missing.yaml: /: cannot read file") for p in problems)
    assert any(p.startswith("terminology/bad.yaml:1: /table:") for p in problems)
    assert any(p.startswith("terminology/bad.yaml:2: /rows:") for p in problems)


def test_pack_manifest_errors(tmp_path: Path) -> None:
    root = write_pack(
        tmp_path,
        [patient_rule({"active": True})],
        manifest={"identity": {"namespace": "not-a-uuid", "system": "x", "source": "$.source"}},
    )
    problems = _problems(root)
    assert any("/identity/namespace" in p for p in problems)
    assert any("/identity/system" in p for p in problems)


def test_duplicate_kind_with_another_resource_type(tmp_path: Path) -> None:
    rules = [
        patient_rule({"active": True}),
        {
            **patient_rule({"status": "final", "code": {"text": "x"}}),
            "name": "other",
            "resource": "Observation",
        },
    ]
    problems = _problems(write_pack(tmp_path, rules))
    assert any("kind 'patient' already makes Patient" in p for p in problems)
