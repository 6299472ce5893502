"""OutputValidator: R4B models + official R4 JSON Schema, FHIRPath locations, no PHI in messages."""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
from fhir.resources.R4B import get_fhir_model_class

from fhirbridge.errors import Issue
from fhirbridge.fhir import validate as mod
from fhirbridge.fhir.validate import EMITTED_RESOURCE_TYPES, SCHEMA_SHA256, OutputValidator

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_FILE = ROOT / "fhirbridge" / "schemas" / "fhir.schema.json"
EXAMPLES = ROOT / "tests" / "data" / "r4-examples"
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.json"))

SENTINEL = "SENTINEL-PHI-Jane-Doe-1970"

VALIDATOR = OutputValidator()

Mutation = Callable[[dict[str, Any]], None]


def example(name: str) -> dict[str, Any]:
    """A fresh copy of an official example (tests mutate it)."""
    data: dict[str, Any] = json.loads((EXAMPLES / f"{name}.json").read_bytes())
    return data


def minimal_observation() -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": "2024-05-01T10:00:00+02:00",
        "valueQuantity": {
            "value": 72,
            "unit": "beats/minute",
            "system": "http://unitsofmeasure.org",
            "code": "/min",
        },
    }


def located(issues: list[Issue]) -> list[tuple[str, str]]:
    return [(i.expression[0] if i.expression else "", i.code) for i in issues]


def schema_accepts(resource: Any) -> bool:
    return bool(mod._schema().validator.is_valid(resource))


def r4b_accepts(resource: dict[str, Any]) -> bool:
    try:
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    except Exception:
        return False
    return True


# --------------------------------------------------------------------------------------------
# The shipped schema and its load-time patch
# --------------------------------------------------------------------------------------------


def test_shipped_schema_is_the_pinned_upstream_file() -> None:
    digest = hashlib.sha256(SCHEMA_FILE.read_bytes()).hexdigest()
    assert digest == SCHEMA_SHA256
    assert SCHEMA_SHA256 in (SCHEMA_FILE.parent / "PROVENANCE.md").read_text(encoding="utf-8")


def test_patch_adds_object_type_in_memory_only() -> None:
    on_disk = json.loads(SCHEMA_FILE.read_bytes())["definitions"]
    patched, count = mod._load_patched_schema()
    assert "type" not in on_disk["Observation"]  # the file keeps the upstream defect
    assert count == sum(1 for d in on_disk.values() if "properties" in d and "type" not in d)
    assert count > 600
    for name, definition in patched["definitions"].items():
        if "properties" in definition:
            assert definition["type"] == "object", name
    # primitives keep their own type
    assert patched["definitions"]["decimal"]["type"] == "number"


@pytest.mark.parametrize(
    ("resource_type", "element", "expression", "expected"),
    [
        ("Observation", "code", "Observation.code", "CodeableConcept"),
        ("Observation", "subject", "Observation.subject", "Reference"),
        ("Observation", "valueQuantity", "Observation.valueQuantity", "Quantity"),
        ("Observation", "meta", "Observation.meta", "Meta"),
    ],
)
def test_array_where_object_required_is_rejected(
    resource_type: str, element: str, expression: str, expected: str
) -> None:
    resource = minimal_observation()
    resource.setdefault(element, {"versionId": "1"})
    resource[element] = [resource[element]]
    definitions = json.loads(SCHEMA_FILE.read_bytes())["definitions"]
    unpatched = jsonschema_rs.Draft6Validator(
        {"$ref": f"#/definitions/{resource_type}", "definitions": definitions}, offline=True
    )
    assert unpatched.is_valid(resource), "the upstream defect this patch exists for"
    assert not schema_accepts(resource)
    issues = mod._schema_findings(resource, resource_type, mod._schema())
    assert [(f.path, f.code) for f in issues] == [((element,), "structure")]
    assert (expression, "structure") in located(VALIDATOR.validate(resource))
    assert any(expected in i.diagnostics for i in VALIDATOR.validate(resource))


def test_patch_side_effect_null_placeholder_in_primitive_extension_array() -> None:
    """Documented in schemas/PROVENANCE.md: `Element` is now an object, so FHIR's null
    placeholder in `_given` is rejected (the schema already rejected it in `given`)."""
    patient = {
        "resourceType": "Patient",
        "name": [
            {
                "given": ["Ann", "Bo"],
                "_given": [None, {"extension": [{"url": "http://x.org/e", "valueString": "y"}]}],
            }
        ],
    }
    assert r4b_accepts(patient)
    assert located(VALIDATOR.validate(patient)) == [("Patient.name[0]._given[0]", "structure")]


# --------------------------------------------------------------------------------------------
# What each validator catches
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "element", "expression"),
    [
        ("Observation-heart-rate", "status", "Observation.status"),
        ("Patient-example", "gender", "Patient.gender"),
        ("Encounter-example", "status", "Encounter.status"),
        ("AdverseEvent-example", "actuality", "AdverseEvent.actuality"),
        ("EpisodeOfCare-example", "status", "EpisodeOfCare.status"),
    ],
)
def test_schema_rejects_bad_required_binding_that_r4b_accepts(
    name: str, element: str, expression: str
) -> None:
    resource = example(name)
    resource[element] = "bogus"
    assert r4b_accepts(resource)
    issues = VALIDATOR.validate(resource)
    assert located(issues) == [(expression, "code-invalid")]
    assert "required value set" in issues[0].diagnostics
    assert "bogus" not in issues[0].diagnostics


@pytest.mark.parametrize(
    "name", ["Procedure-example", "MedicationAdministration-medadminexample03"]
)
def test_known_gap_status_bindings_the_schema_does_not_enumerate(name: str) -> None:
    """Procedure.status and MedicationAdministration.status have required bindings in R4,
    but the schema types them as plain `code` (no enum) and R4B does not check codes:
    neither validator catches a bad value. Callers must not rely on this module for them."""
    resource = example(name)
    resource["status"] = "bogus"
    assert VALIDATOR.validate(resource) == []


def test_enum_diagnostics_list_the_allowed_codes() -> None:
    resource = minimal_observation()
    resource["status"] = "bogus"
    (issue,) = VALIDATOR.validate(resource)
    assert issue.diagnostics == (
        "code is not in the required value set (registered, preliminary, final, amended, "
        "corrected, cancelled, entered-in-error, unknown)"
    )


def _set(path: tuple[str | int, ...], value: Any) -> Mutation:
    def mutate(resource: dict[str, Any]) -> None:
        node: Any = resource
        for step in path[:-1]:
            node = node[step]
        node[path[-1]] = value

    return mutate


def _delete(key: str) -> Mutation:
    return lambda resource: resource.pop(key)


def _both(*mutations: Mutation) -> Mutation:
    def mutate(resource: dict[str, Any]) -> None:
        for m in mutations:
            m(resource)

    return mutate


# (mutation, expected issues as (expression, code), does R4B alone see it, does the schema)
ISSUE_TABLE: list[tuple[str, Mutation, list[tuple[str, str]], bool, bool]] = [
    (
        "missing required element",
        _delete("code"),
        [("Observation.code", "required")],
        True,
        True,
    ),
    (
        "missing required primitive (schema allows _status alone)",
        _delete("status"),
        [("Observation.status", "required")],
        True,
        False,
    ),
    (
        "unknown element",
        _set(("nonsense",), "x"),
        [("Observation.nonsense", "structure")],
        True,
        True,
    ),
    (
        "unknown element in a datatype",
        _set(("subject", "foo"), "x"),
        [("Observation.subject.foo", "structure")],
        True,
        True,
    ),
    (
        "code with double space",
        _set(("valueQuantity", "code"), "a  b"),
        [("Observation.valueQuantity.code", "value")],
        True,
        True,
    ),
    (
        "dateTime with time but no zone",
        _set(("effectiveDateTime",), "2024-05-01T10:00:00"),
        [("Observation.effectiveDateTime", "value")],
        True,
        True,
    ),
    (
        "decimal as JSON string (R4B coerces it)",
        _set(("valueQuantity", "value"), "72"),
        [("Observation.valueQuantity.value", "structure")],
        False,
        True,
    ),
    (
        "uri with a space (R4B lets it through)",
        _set(("valueQuantity", "system"), "http://unitsofmeasure.org x"),
        [("Observation.valueQuantity.system", "value")],
        False,
        True,
    ),
    (
        "two choices of value[x]",
        _set(("valueString",), "seventy-two"),
        [("Observation", "structure")],
        True,
        False,
    ),
    (
        "integer with a fraction (schema types integer as number)",
        _both(_delete("valueQuantity"), _set(("valueInteger",), 1.5)),
        [("Observation.valueInteger", "value")],
        True,
        False,
    ),
    (
        "impossible calendar date",
        _set(("effectiveDateTime",), "2024-02-30"),
        [("Observation.effectiveDateTime", "value")],
        True,
        False,
    ),
    (
        "null in an array of complex elements",
        _set(("category",), [None]),
        # R4B reports the null at the array, the schema at the item
        [("Observation.category", "structure"), ("Observation.category[0]", "structure")],
        True,
        True,
    ),
    (
        "number where a string is required",
        _set(("subject", "display"), 5),
        [("Observation.subject.display", "structure")],
        True,
        True,
    ),
    (
        "contained resource with a bad code",
        _set(("contained",), [{"resourceType": "Patient", "id": "p", "gender": "x"}]),
        [("Observation.contained[0].gender", "code-invalid")],
        False,
        True,
    ),
]


@pytest.mark.parametrize(
    ("mutation", "expected", "r4b_sees", "schema_sees"),
    [pytest.param(*row[1:], id=row[0]) for row in ISSUE_TABLE],
)
def test_issue_location_and_code(
    mutation: Mutation, expected: list[tuple[str, str]], r4b_sees: bool, schema_sees: bool
) -> None:
    resource = minimal_observation()
    mutation(resource)
    assert located(VALIDATOR.validate(resource)) == expected
    assert r4b_accepts(resource) is not r4b_sees
    assert schema_accepts(resource) is not schema_sees


@pytest.mark.parametrize(
    ("mutation", "diagnostics"),
    [
        pytest.param(_delete("code"), ["required element is missing"], id="required"),
        pytest.param(
            _set(("code",), [{"text": "x"}]),
            ["wrong type: expected CodeableConcept (JSON object)"],
            id="complex type",
        ),
        pytest.param(
            _set(("effectiveDateTime",), "2024-05-01T10:00"),
            ["not a valid FHIR dateTime"],
            id="primitive format",
        ),
        pytest.param(
            _set(("effectiveDateTime",), "2024-05-01T10:00:00"),
            ["not a valid FHIR dateTime"],
            id="dateTime without zone (schema wording kept)",
        ),
        pytest.param(
            _set(("effectiveDateTime",), "2024-02-30"),
            ["not a valid calendar date or time"],
            id="calendar",
        ),
        pytest.param(_set(("issued",), "2024-05-01"), ["not a valid FHIR instant"], id="instant"),
        pytest.param(
            _both(_delete("valueQuantity"), _set(("valueBoolean",), "true")),
            ["wrong type: expected FHIR boolean (JSON boolean)"],
            id="inlined primitive type",
        ),
        pytest.param(
            _both(_delete("valueQuantity"), _set(("valueInteger",), 2**40)),
            ["must be <= 2147483647"],
            id="integer range",
        ),
        pytest.param(
            _set(("valueString",), "x"),
            [
                "only one choice of a [x] element may be present (valueBoolean, "
                "valueCodeableConcept, valueDateTime, valueInteger, valuePeriod, valueQuantity, "
                "valueRange, valueRatio, valueSampledData, valueString, valueTime)"
            ],
            id="choice",
        ),
    ],
)
def test_diagnostics_wording(mutation: Mutation, diagnostics: list[str]) -> None:
    resource = minimal_observation()
    mutation(resource)
    assert [i.diagnostics for i in VALIDATOR.validate(resource)] == diagnostics


def test_nested_fhirpath_with_list_indices() -> None:
    resource = example("Observation-blood-pressure")
    resource["component"][1]["valueQuantity"]["code"] = "mm  Hg"
    assert located(VALIDATOR.validate(resource)) == [
        ("Observation.component[1].valueQuantity.code", "value")
    ]


def test_resources_inside_a_bundle_are_validated_with_their_own_definition() -> None:
    inner = minimal_observation()
    inner["status"] = "bogus"
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": inner}]}
    assert located(VALIDATOR.validate(bundle)) == [
        ("Bundle.entry[0].resource.status", "code-invalid")
    ]


@pytest.mark.parametrize(
    ("contained", "expected"),
    [
        ({"resourceType": "Nope"}, ("Encounter.contained[0].resourceType", "code-invalid")),
        ({"id": "x"}, ("Encounter.contained[0].resourceType", "required")),
        ("not an object", ("Encounter.contained[0]", "structure")),
    ],
)
def test_bad_contained_resource_is_an_issue_not_an_exception(
    contained: Any, expected: tuple[str, str]
) -> None:
    resource = example("Encounter-example")
    resource["contained"] = [contained]
    issues = located(VALIDATOR.validate(resource))
    assert expected in issues
    # fhir.resources raises a bare KeyError for an unknown contained type; it becomes an issue
    assert all(code in {"code-invalid", "required", "structure", "exception"} for _, code in issues)


# --------------------------------------------------------------------------------------------
# Merge: deduplication and order
# --------------------------------------------------------------------------------------------


def test_same_problem_from_both_validators_is_reported_once() -> None:
    resource = minimal_observation()
    del resource["code"]
    resource["nonsense"] = 1
    assert not r4b_accepts(resource)
    assert not schema_accepts(resource)
    assert VALIDATOR.validate(resource) == [
        Issue("required element is missing", ("Observation.code",), "required"),
        Issue(
            "element is not defined for this FHIR R4 type", ("Observation.nonsense",), "structure"
        ),
    ]


def test_different_findings_at_one_location_are_both_kept() -> None:
    resource = minimal_observation()
    resource["valueQuantity"]["value"] = "seventy"  # not a number (schema), not a decimal (R4B)
    assert VALIDATOR.validate(resource) == [
        Issue(
            "wrong type: expected FHIR decimal (JSON number)",
            ("Observation.valueQuantity.value",),
            "structure",
        ),
        Issue("not a valid FHIR decimal", ("Observation.valueQuantity.value",), "value"),
    ]


def test_issues_are_sorted_by_location_with_numeric_indices() -> None:
    resource = minimal_observation()
    resource["component"] = [{"code": {"text": f"c{i}"}, "valueInteger": i} for i in range(12)]
    resource["component"][10]["valueInteger"] = "ten"
    resource["component"][2]["valueInteger"] = "two"
    resource["zzz"] = 1
    resource["category"] = {"text": "not a list"}
    issues = VALIDATOR.validate(resource)
    assert list(dict.fromkeys(i.expression[0] for i in issues)) == [
        "Observation.category",
        "Observation.component[2].valueInteger",  # [2] before [10]: indices sort as numbers
        "Observation.component[10].valueInteger",
        "Observation.zzz",
    ]
    assert len(issues) == len(set(issues))


# --------------------------------------------------------------------------------------------
# Bad input never raises
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resource", "expected"),
    [
        ([], ("", "structure")),
        ("Observation", ("", "structure")),
        (None, ("", "structure")),
        (42, ("", "structure")),
        ({}, ("Resource.resourceType", "required")),
        ({"status": "final"}, ("Resource.resourceType", "required")),
        ({"resourceType": "Foo"}, ("Resource.resourceType", "code-invalid")),
        ({"resourceType": 5}, ("Resource.resourceType", "code-invalid")),
        ({"resourceType": ["Observation"]}, ("Resource.resourceType", "code-invalid")),
        ({"resourceType": "CodeableConcept"}, ("Resource.resourceType", "code-invalid")),
        ({"resourceType": "ResourceList"}, ("Resource.resourceType", "code-invalid")),
    ],
)
def test_unusable_input_is_one_issue(resource: Any, expected: tuple[str, str]) -> None:
    assert located(VALIDATOR.validate(resource)) == [expected]


def test_r4_type_missing_from_r4b_is_not_silently_accepted() -> None:
    issues = VALIDATOR.validate(
        {"resourceType": "MedicinalProduct", "name": [{"productName": "x"}]}
    )
    assert located(issues) == [("MedicinalProduct", "not-supported")]


def test_input_is_not_modified() -> None:
    for resource in (example("MedicationAdministration-medadminexample03"), minimal_observation()):
        resource["status"] = "bogus"
        resource["contained"] = [{"resourceType": "Patient", "birthDate": "x"}]
        before = copy.deepcopy(resource)
        assert VALIDATOR.validate(resource)
        assert resource == before


# --------------------------------------------------------------------------------------------
# PHI: diagnostics never carry instance values
# --------------------------------------------------------------------------------------------

PHI_CASES: list[tuple[str, Mutation]] = [
    ("as a decimal", _set(("valueQuantity", "value"), SENTINEL)),
    ("as a code", _set(("valueQuantity", "code"), f"{SENTINEL}  x")),
    ("as a bound code", _set(("status",), SENTINEL)),
    ("as an unknown element's value", _set(("nonsense",), SENTINEL)),
    ("as an unknown element's object", _set(("nonsense",), {"name": SENTINEL})),
    ("in a dateTime", _set(("effectiveDateTime",), SENTINEL)),
    ("in an instant", _set(("issued",), f"1970-01-01 {SENTINEL}")),
    ("as an id", _set(("id",), SENTINEL + " " + SENTINEL)),
    ("as a boolean", _both(_delete("valueQuantity"), _set(("valueBoolean",), SENTINEL))),
    ("as an integer", _both(_delete("valueQuantity"), _set(("valueInteger",), SENTINEL))),
    ("as a uri", _set(("valueQuantity", "system"), f"urn:{SENTINEL} x")),
    ("as an object", _set(("code",), SENTINEL)),
    ("in a list of objects", _set(("category",), [SENTINEL])),
    ("as a list where an object goes", _set(("subject",), [SENTINEL])),
    ("as a resourceType", _set(("resourceType",), SENTINEL)),
    ("in a reference", _set(("subject",), {"reference": "Patient/1", "extra": SENTINEL})),
    (
        "in an extension",
        _set(("extension",), [{"url": "http://x.org/e", "valueDecimal": SENTINEL}]),
    ),
    (
        "in a contained patient",
        _set(
            ("contained",),
            [
                {
                    "resourceType": "Patient",
                    "name": [{"family": 1, "given": [SENTINEL, 2]}],
                    "birthDate": SENTINEL,
                    "gender": SENTINEL,
                    "nickname": SENTINEL,
                }
            ],
        ),
    ),
    ("as a contained resourceType", _set(("contained",), [{"resourceType": SENTINEL}])),
]


@pytest.mark.parametrize("mutation", [pytest.param(m, id=i) for i, m in PHI_CASES])
def test_diagnostics_never_contain_the_instance_value(mutation: Mutation) -> None:
    resource = minimal_observation()
    mutation(resource)
    issues = VALIDATOR.validate(resource)
    assert issues
    for issue in issues:
        text = json.dumps(issue.to_fhir())
        for fragment in (SENTINEL, "SENTINEL", "Jane", "1970"):
            assert fragment not in text, issue


# --------------------------------------------------------------------------------------------
# Official R4 examples
# --------------------------------------------------------------------------------------------


def test_the_examples_needed_are_present() -> None:
    names = {p.stem for p in EXAMPLE_FILES}
    assert len(names) == 12
    types = {json.loads(p.read_bytes())["resourceType"] for p in EXAMPLE_FILES}
    assert types == {
        "AdverseEvent",
        "Encounter",
        "EpisodeOfCare",
        "MedicationAdministration",
        "Observation",
        "Patient",
        "Procedure",
        "Provenance",
    }


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=[p.stem for p in EXAMPLE_FILES])
def test_official_r4_example_passes_both_validators(path: Path) -> None:
    # All 12 pass both validators as shipped; no known-failure exceptions are needed.
    resource = json.loads(path.read_bytes())
    assert r4b_accepts(resource)
    assert schema_accepts(resource)
    assert VALIDATOR.validate(resource) == []


# --------------------------------------------------------------------------------------------
# Laziness
# --------------------------------------------------------------------------------------------


def test_import_and_construction_build_nothing() -> None:
    code = (
        "from fhirbridge.fhir import validate as m\n"
        "m.OutputValidator()\n"
        "assert m._schema_state is None\n"
        "assert m._r4b_model.cache_info().currsize == 0\n"
        "assert m._detail_validator.cache_info().currsize == 0\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_warm_builds_the_schema_and_emitted_models() -> None:
    VALIDATOR.warm()
    assert mod._schema_state is not None
    for resource_type in EMITTED_RESOURCE_TYPES:
        assert mod._r4b_model(resource_type) is get_fhir_model_class(resource_type)
