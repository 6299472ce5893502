"""The mapping language: expressions, pruning, identity, references, tables and traces."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from fhirbridge.mapping.engine import content_hash, map_submission
from fhirbridge.mapping.pack import load_pack
from tests.unit.packs import patient_rule, write_pack

NOW = datetime(2026, 11, 25, 4, 0, 0, tzinfo=UTC)
NS = uuid.UUID("12345678-1234-5678-1234-567812345678")
DOC: dict[str, Any] = {
    "source": "clinic-x",
    "patient": {"id": "p1", "nick": None, "tags": ["a", "b"], "n": 3, "f": 2.5},
    "items": [
        {"id": "i1", "kind": "x", "v": 1, "when": "2026-03-02T09:00:00-05:00"},
        {"id": "i2", "kind": "y", "v": 2, "when": "2026-03-02T13:30:00+00:00"},
        {"id": "i3", "kind": "x", "v": 3, "when": "2026-03-02T08:00:00-05:00"},
    ],
}


def _map(tmp_path: Path, template: dict[str, Any], tables: Any = None, **extra: Any) -> Any:
    pack = load_pack(write_pack(tmp_path, [patient_rule(template, **extra)], tables))
    return map_submission(pack, DOC, now=NOW).resources[0]


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        # a literal passes through unchanged
        ({"gender": "female"}, {"gender": "female"}),
        # a path on the current record
        ({"gender": "$.id"}, {"gender": "p1"}),
        # a path on the whole submission
        ({"gender": "$submission.source"}, {"gender": "clinic-x"}),
        # interpolation; $source is the submitting system
        ({"gender": "{$source}/{$.id}"}, {"gender": "clinic-x/p1"}),
        # a null placeholder makes the whole string null, which is then pruned
        ({"gender": "x{$.nick}", "active": True}, {"active": True}),
        # "$$" escapes a literal dollar
        ({"gender": "$$notapath"}, {"gender": "$notapath"}),
        # nulls, empty lists and empty objects are pruned recursively
        ({"name": [{"family": "$.missing", "given": []}], "active": False}, {"active": False}),
        # wildcard paths give lists
        ({"gender": {"$min": "$submission.items[*].v"}}, {"gender": 1}),
        # $min / $max compare date-times by instant, not by text
        (
            {"gender": {"$max": "$submission.items[*].when"}},
            {"gender": "2026-03-02T09:00:00-05:00"},
        ),
        (
            {"gender": {"$min": "$submission.items[*].when"}},
            {"gender": "2026-03-02T08:00:00-05:00"},
        ),
        # constants from pack.yaml
        ({"gender": "$const.sys"}, {"gender": "http://example.org/cs"}),
        # $if on truthiness, with else
        ({"gender": {"$if": "$.nick", "then": "a", "else": "b"}}, {"gender": "b"}),
        ({"gender": {"$if": "$.id", "then": "a", "else": "b"}}, {"gender": "a"}),
        # $eq / $ne / $and / $or / $not / $exists
        ({"active": {"$eq": ["$.id", "p1"]}}, {"active": True}),
        ({"active": {"$ne": ["$.id", "p1"]}}, {"active": False}),
        ({"active": {"$and": ["$.id", "$.nick"]}}, {"active": False}),
        ({"active": {"$or": ["$.nick", "$.id"]}}, {"active": True}),
        ({"active": {"$not": "$.nick"}}, {"active": True}),
        ({"active": {"$exists": "$.n"}}, {"active": True}),
        # $integer only for whole numbers; $coalesce picks the first non-null
        ({"multipleBirthInteger": {"$integer": "$.n"}}, {"multipleBirthInteger": 3}),
        ({"multipleBirthInteger": {"$integer": "$.f"}}, {}),
        ({"gender": {"$coalesce": ["$.nick", "$.id"]}}, {"gender": "p1"}),
        # $literal protects a value that looks like an expression
        ({"gender": {"$literal": "$.id"}}, {"gender": "$.id"}),
        # $each builds lists, binding `as`, and is spliced into a surrounding list
        (
            {"name": {"$each": "$.tags", "as": "t", "do": {"text": "$t"}}},
            {"name": [{"text": "a"}, {"text": "b"}]},
        ),
        (
            {"name": [{"text": "first"}, {"$each": "$.tags", "as": "t", "do": {"text": "$t"}}]},
            {"name": [{"text": "first"}, {"text": "a"}, {"text": "b"}]},
        ),
        # $each with let, and $find (indexed lookup in a collection)
        (
            {
                "name": {
                    "$each": "$.tags",
                    "as": "t",
                    "let": {"hit": {"$find": "$submission.items", "where": {"kind": "y"}}},
                    "do": {"text": "{$t}-{$hit.id}"},
                }
            },
            {"name": [{"text": "a-i2"}, {"text": "b-i2"}]},
        ),
        ({"gender": {"$find": "$submission.items", "where": {"kind": "z"}}}, {}),
    ],
)
def test_expressions(tmp_path: Path, template: dict[str, Any], expected: dict[str, Any]) -> None:
    resource = _map(tmp_path, template)
    body = {k: v for k, v in resource.items() if k not in ("resourceType", "id", "identifier")}
    assert body == expected


def test_identity_gives_deterministic_id_and_leading_identifier(tmp_path: Path) -> None:
    resource = _map(tmp_path, {"identifier": [{"system": "urn:mrn", "value": "$.id"}]})
    assert resource["id"] == str(uuid.uuid5(NS, "clinic-x|patient|p1"))
    assert resource["identifier"] == [
        {"system": "urn:test:clinic-x:patient", "value": "p1"},
        {"system": "urn:mrn", "value": "p1"},
    ]
    assert list(resource)[:2] == ["resourceType", "id"]


def test_ref_points_at_the_id_the_other_rule_makes(tmp_path: Path) -> None:
    rules = [
        patient_rule({"active": True}),
        {
            "name": "obs",
            "resource": "Observation",
            "for_each": "$.items",
            "identity": {"kind": "item", "key": "$.id"},
            "template": {
                "status": "final",
                "code": {"text": "$.kind"},
                "subject": {"$ref": "patient", "id": "$submission.patient.id"},
                "focus": [{"$ref": "item", "id": ["$.id", "$.kind"]}],
            },
        },
    ]
    pack = load_pack(write_pack(tmp_path, rules))
    result = map_submission(pack, DOC, now=NOW)
    patient, first = result.resources[0], result.resources[1]
    assert first["subject"] == {"reference": f"Patient/{patient['id']}"}
    assert first["focus"] == [{"reference": f"Observation/{uuid.uuid5(NS, 'clinic-x|item|i1|x')}"}]
    assert [r["identifier"][0]["value"] for r in result.resources[1:]] == ["i1", "i2", "i3"]
    assert result.records()[1] == {
        "record": "$.items[0]",
        "sourceId": "i1",
        "produced": [{"resourceType": "Observation", "id": first["id"]}],
    }


def test_when_filters_records(tmp_path: Path) -> None:
    rules = [
        {
            "name": "obs",
            "resource": "Observation",
            "for_each": "$.items",
            "when": {"$eq": ["$.kind", "x"]},
            "identity": {"kind": "item", "key": "$.id"},
            "template": {"status": "final", "code": {"text": "$.kind"}},
        }
    ]
    pack = load_pack(write_pack(tmp_path, rules))
    ids = [r["identifier"][0]["value"] for r in map_submission(pack, DOC, now=NOW).resources]
    assert ids == ["i1", "i3"]


def test_lookup_hits_defaults_and_counts_unmapped(tmp_path: Path) -> None:
    tables = {"kinds": {"x": {"system": "http://e.org", "code": "X"}}}
    rules = [
        {
            "name": "obs",
            "resource": "Observation",
            "for_each": "$.items",
            "identity": {"kind": "item", "key": "$.id"},
            "template": {
                "status": "final",
                "code": {"coding": [{"$lookup": "kinds", "key": "$.kind"}], "text": "$.kind"},
            },
        }
    ]
    pack = load_pack(write_pack(tmp_path, rules, tables))
    result = map_submission(pack, DOC, now=NOW)
    assert result.resources[0]["code"] == {
        "coding": [{"system": "http://e.org", "code": "X"}],
        "text": "x",
    }
    # unknown key: no invented code, the text stays, and it is counted
    assert result.resources[1]["code"] == {"text": "y"}
    assert [(u.table, u.rule) for u in result.unmapped] == [("kinds", "obs")]
    # tables hand out copies: changing one output never changes another
    result.resources[0]["code"]["coding"][0]["code"] = "changed"
    assert result.resources[2]["code"]["coding"][0]["code"] == "X"


def test_two_records_making_one_resource_differently_is_an_error(tmp_path: Path) -> None:
    from fhirbridge.errors import OutputInvalidError

    rules = [
        {
            "name": "obs",
            "resource": "Observation",
            "for_each": "$.items",
            "identity": {"kind": "k", "key": "$.kind"},
            "template": {"status": "final", "code": {"text": "$.id"}},
        }
    ]
    pack = load_pack(write_pack(tmp_path, rules))
    with pytest.raises(OutputInvalidError) as err:
        map_submission(pack, DOC, now=NOW)
    assert err.value.issues[0].expression == ("$.items[2]", "$.items[0]")


def test_same_resource_from_two_records_is_kept_once_and_linked_from_both(tmp_path: Path) -> None:
    rules = [
        {
            "name": "obs",
            "resource": "Observation",
            "for_each": "$.items",
            "identity": {"kind": "k", "key": "$.kind"},
            "template": {"status": "final", "code": {"text": "$.kind"}},
        }
    ]
    pack = load_pack(write_pack(tmp_path, rules))
    result = map_submission(pack, DOC, now=NOW)
    assert len(result.resources) == 2
    assert [r["record"] for r in result.records()] == ["$.items[0]", "$.items[1]", "$.items[2]"]


def test_trace_names_the_rule_line_of_every_leaf(tmp_path: Path) -> None:
    text = """rules:
  - name: pat
    resource: Patient
    for_each: $.patient
    identity: {kind: patient, key: $.id}
    template:
      active: true
      name:
        - family: $.id
          given:
            $each: $.tags
            as: t
            do: "{$t}!"
"""
    pack = load_pack(write_pack(tmp_path, text))
    result = map_submission(pack, DOC, now=NOW, trace=True)
    assert result.trace is not None
    (entries,) = result.trace.values()
    by_path = {e["path"]: (e["line"], e["pointer"]) for e in entries}
    assert by_path["Patient.resourceType"][0] == 3
    assert by_path["Patient.id"][0] == 5
    assert by_path["Patient.identifier[0].value"][0] == 5
    assert by_path["Patient.active"] == (7, "/rules/0/template/active")
    assert by_path["Patient.name[0].family"] == (9, "/rules/0/template/name/0/family")
    assert by_path["Patient.name[0].given[1]"] == (13, "/rules/0/template/name/0/given/do")
    # every leaf of the output has exactly one trace entry
    assert len(by_path) == len(entries) == 8


def test_untraced_and_traced_mapping_agree(tmp_path: Path) -> None:
    pack = load_pack(Path(__file__).resolve().parents[2] / "mappings")
    doc = __import__("json").loads(
        (
            Path(__file__).resolve().parents[2] / "mappings/fixtures/medicine-session.in.json"
        ).read_text()
    )
    plain = map_submission(pack, doc, now=NOW)
    traced = map_submission(pack, doc, now=NOW, trace=True)
    assert plain.resources == traced.resources
    assert traced.trace is not None and set(traced.trace) == {
        f"{r['resourceType']}/{r['id']}" for r in plain.resources
    }


def test_content_hash_ignores_key_order() -> None:
    assert content_hash({"a": 1, "b": [1, 2]}) == content_hash({"b": [1, 2], "a": 1})
    assert content_hash({"a": 1}) != content_hash({"a": 2})


def _leaf_paths(value: Any, path: str) -> set[str]:
    if isinstance(value, dict):
        return set().union(*(_leaf_paths(v, f"{path}.{k}") for k, v in value.items()))
    if isinstance(value, list):
        return set().union(*(_leaf_paths(v, f"{path}[{i}]") for i, v in enumerate(value)))
    return {path}


def test_medicine_session_trace_covers_every_element_with_a_real_rule_line() -> None:
    root = Path(__file__).resolve().parents[2]
    pack = load_pack(root / "mappings")
    doc = __import__("json").loads(
        (root / "mappings/fixtures/medicine-session.in.json").read_text()
    )
    result = map_submission(pack, doc, now=NOW, trace=True)
    assert result.trace is not None
    for resource in result.resources:
        rows = result.trace[f"{resource['resourceType']}/{resource['id']}"]
        assert {r["path"] for r in rows} == _leaf_paths(resource, resource["resourceType"])
        assert len(rows) == len({r["path"] for r in rows})  # one rule per element
        for row in rows:
            lines = (root / "mappings" / row["file"]).read_text().splitlines()
            assert 1 <= row["line"] <= len(lines)
    # elements from a table name the table
    (nausea,) = [r for r in result.resources if r["resourceType"] == "AdverseEvent"][:1]
    coded = next(
        r
        for r in result.trace[f"AdverseEvent/{nausea['id']}"]
        if r["path"] == "AdverseEvent.event.coding[0].code"
    )
    assert coded["detail"] == "table adverse-event-terms (terminology/adverse-event-terms.yaml)"
