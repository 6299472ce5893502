"""The R4 vital-signs profile rules: each fails alone on an otherwise valid Observation.

Every case mutates a valid Observation and expects exactly one (location, issue code) from the
full checker (R4B models + R4 schema + profile rules), which also proves the mutation is
structurally valid R4 and that only the profile rule objects to it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fhirbridge.errors import Issue
from fhirbridge.fhir.checker import check_resource
from fhirbridge.fhir.profiles import (
    VITAL_SIGNS_PROFILES,
    applicable_profiles,
    check_vital_signs,
    is_vital_signs,
)
from fhirbridge.fhir.validate import OutputValidator

EXAMPLES = Path(__file__).resolve().parents[1] / "data" / "r4-examples"
SD = "http://hl7.org/fhir/StructureDefinition/"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
SENTINEL = "SENTINEL-PHI-Jane-Doe-1970"
VALIDATOR = OutputValidator()

Mutation = Callable[[dict[str, Any]], None]


def example(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((EXAMPLES / f"Observation-{name}.json").read_bytes())
    return data


def vital(profile: str, loinc: str, value: float | None, unit: str | None) -> dict[str, Any]:
    """A minimal valid Observation of one specific vital-signs profile."""
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "meta": {"profile": [SD + profile]},
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "vital-signs",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": LOINC, "code": loinc}]},
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": "2026-03-02T09:20:00-05:00",
    }
    if value is not None:
        obs["valueQuantity"] = {"value": value, "unit": unit, "system": UCUM, "code": unit}
    return obs


def bp() -> dict[str, Any]:
    obs = vital("bp", "85354-9", None, None)
    obs["component"] = [
        {
            "code": {"coding": [{"system": LOINC, "code": code}]},
            "valueQuantity": {"value": v, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"},
        }
        for code, v in (("8480-6", 118), ("8462-4", 76))
    ]
    return obs


def panel() -> dict[str, Any]:
    obs = vital("vitalspanel", "85353-1", None, None)
    obs["hasMember"] = [{"reference": "Observation/hr"}]
    return obs


BASES: dict[str, Callable[[], dict[str, Any]]] = {
    "hr": lambda: example("heart-rate"),
    "bp": lambda: example("blood-pressure"),
    "temp": lambda: example("body-temperature"),
    "rr": lambda: example("respiratory-rate"),
    "spo2": lambda: example("satO2"),
    "height": lambda: vital("bodyheight", "8302-2", 170, "cm"),
    "weight": lambda: vital("bodyweight", "29463-7", 70, "kg"),
    "bmi": lambda: vital("bmi", "39156-5", 24.2, "kg/m2"),
    "head": lambda: vital("headcircum", "9843-4", 35, "cm"),
    "my-bp": bp,
    "panel": panel,
}


def located(issues: list[Issue]) -> list[tuple[str, str, str]]:
    return [(i.expression[0] if i.expression else "", i.code, i.severity) for i in issues]


DELETE = object()


def setter(path: str, value: Any) -> Mutation:
    """``setter("valueQuantity.code", "x")``; a value of DELETE removes the element."""

    def mutate(resource: dict[str, Any]) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        node: Any = resource
        for step in parents:
            node = node[step]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value

    return mutate


def chain(*mutations: Mutation) -> Mutation:
    def mutate(resource: dict[str, Any]) -> None:
        for m in mutations:
            m(resource)

    return mutate


def drop_component(index: int) -> Mutation:
    return lambda r: r["component"].pop(index)


DAR_SYSTEM = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
DAR = {"coding": [{"system": DAR_SYSTEM, "code": "unknown"}]}
CLAIM_HR = setter("meta.profile", [SD + "heartrate"])

# (id, base, mutation, expected [(location, code, severity)])
CASES: list[tuple[str, str, Mutation, list[tuple[str, str, str]]]] = [
    # base profile (vitalsigns)
    ("missing-status", "hr", setter("status", DELETE),
     [("Observation.status", "required", "error")]),
    ("missing-category", "hr", setter("category", DELETE),
     [("Observation.category", "required", "error")]),
    ("category-without-vital-signs", "temp",
     setter("category", [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                     "observation-category", "code": "survey"}]}]),
     [("Observation.category", "required", "error")]),
    ("category-code-without-its-system", "rr", setter("category.0.coding.0.system", DELETE),
     [("Observation.category", "required", "error")]),
    ("missing-subject", "hr", setter("subject", DELETE),
     [("Observation.subject", "required", "error")]),
    ("subject-not-a-patient", "hr", setter("subject", {"reference": "Group/g1"}),
     [("Observation.subject.reference", "value", "error")]),
    ("subject-absolute-url-not-a-patient", "temp",
     setter("subject", {"reference": "https://ehr.example/fhir/Device/d1/_history/2"}),
     [("Observation.subject.reference", "value", "error")]),
    ("subject-type-not-patient", "hr", setter("subject", {"type": "Device", "display": "x"}),
     [("Observation.subject.type", "value", "error")]),
    ("missing-effective", "hr", setter("effectiveDateTime", DELETE),
     [("Observation.effective", "required", "error")]),
    ("effective-instant-not-allowed", "hr",
     chain(setter("effectiveDateTime", DELETE),
           setter("effectiveInstant", "2026-03-02T09:20:00-05:00")),
     [("Observation.effectiveInstant", "structure", "error")]),
    ("vs-1-effective-not-to-the-day", "hr", setter("effectiveDateTime", "1999-07"),
     [("Observation.effectiveDateTime", "invariant", "error")]),
    ("vs-2-no-value-no-absent-reason", "hr", setter("valueQuantity", DELETE),
     [("Observation", "invariant", "error")]),
    ("component-unit-outside-ucum-vitals-common", "hr",
     setter("component", [{"code": {"text": "x"},
                           "valueQuantity": {"value": 1, "system": UCUM, "code": "mg"}}]),
     [("Observation.component[0].valueQuantity.code", "code-invalid", "error")]),
    ("vs-3-component-without-value", "hr",
     setter("component", [{"code": {"text": "x"}}]),
     [("Observation.component[0]", "invariant", "error")]),
    # specific profiles: the LOINC slice
    ("wrong-loinc-for-claimed-profile", "hr",
     chain(CLAIM_HR, setter("code.coding.0.code", "8310-4")),
     [("Observation.code", "required", "error")]),
    ("loinc-code-under-another-system", "weight",
     setter("code.coding.0.system", "http://snomed.info/sct"),
     [("Observation.code", "required", "error")]),
    # pinned: 2708-6 is the fixed 1..1 slice; 59408-5 may be added, not substituted
    ("spo2-coded-only-59408-5", "spo2",
     setter("code.coding", [{"system": LOINC, "code": "59408-5"}]),
     [("Observation.code", "required", "error")]),
    # valueQuantity
    ("wrong-ucum-code-hr", "hr", setter("valueQuantity.code", "beats/min"),
     [("Observation.valueQuantity.code", "code-invalid", "error")]),
    ("wrong-ucum-code-temp", "temp", setter("valueQuantity.code", "K"),
     [("Observation.valueQuantity.code", "code-invalid", "error")]),
    ("wrong-ucum-code-spo2", "spo2", setter("valueQuantity.code", "%{saturation}"),
     [("Observation.valueQuantity.code", "code-invalid", "error")]),
    ("wrong-ucum-code-height", "height", setter("valueQuantity.code", "m"),
     [("Observation.valueQuantity.code", "code-invalid", "error")]),
    ("wrong-ucum-code-weight", "weight", setter("valueQuantity.code", "kg/m2"),
     [("Observation.valueQuantity.code", "code-invalid", "error")]),
    ("wrong-ucum-code-bmi", "bmi", setter("valueQuantity.code", "kg"),
     [("Observation.valueQuantity.code", "code-invalid", "error")]),
    ("wrong-ucum-code-head", "head", setter("valueQuantity.code", "mm"),
     [("Observation.valueQuantity.code", "code-invalid", "error")]),
    ("missing-ucum-code", "rr", setter("valueQuantity.code", DELETE),
     [("Observation.valueQuantity.code", "required", "error")]),
    ("unit-system-not-ucum", "hr", setter("valueQuantity.system", "http://example.org/units"),
     [("Observation.valueQuantity.system", "value", "error")]),
    ("missing-unit", "hr", setter("valueQuantity.unit", DELETE),
     [("Observation.valueQuantity.unit", "required", "error")]),
    ("missing-value", "temp", setter("valueQuantity.value", DELETE),
     [("Observation.valueQuantity.value", "required", "error")]),
    ("value-not-a-quantity", "hr",
     chain(setter("valueQuantity", DELETE), setter("valueString", "fast")),
     [("Observation.valueString", "structure", "error")]),
    ("bmi-value-is-required", "bmi",
     chain(setter("valueQuantity", DELETE), setter("dataAbsentReason", DAR)),
     [("Observation.valueQuantity", "required", "error")]),
    # blood pressure
    ("bp-missing-diastolic", "bp", drop_component(1),
     [("Observation.component", "required", "error")]),
    ("bp-missing-systolic", "my-bp", drop_component(0),
     [("Observation.component", "required", "error")]),
    ("bp-diastolic-wrong-unit", "bp", setter("component.1.valueQuantity.code", "kPa"),
     [("Observation.component[1].valueQuantity.code", "code-invalid", "error")]),
    ("bp-systolic-not-ucum", "my-bp", setter("component.0.valueQuantity.system", "urn:x"),
     [("Observation.component[0].valueQuantity.system", "value", "error")]),
    ("bp-component-without-value-or-reason", "my-bp",
     setter("component.1.valueQuantity", DELETE),
     [("Observation.component[1]", "invariant", "error")]),
    ("bp-without-components", "my-bp", setter("component", DELETE),
     [("Observation", "invariant", "error"), ("Observation.component", "required", "error"),
      ("Observation.component", "required", "error")]),
    ("bp-has-no-value-of-its-own", "my-bp",
     setter("valueQuantity", {"value": 1, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"}),
     [("Observation.valueQuantity", "structure", "error")]),
    ("bp-second-systolic", "my-bp",
     lambda r: r["component"].append(copy.deepcopy(r["component"][0])),
     [("Observation.component[2]", "structure", "error")]),
    # vital signs panel
    ("panel-needs-members", "panel", setter("hasMember", DELETE),
     [("Observation", "invariant", "error"), ("Observation.hasMember", "required", "error")]),
    ("panel-has-no-value", "panel",
     setter("valueQuantity", {"value": 1, "unit": "/min", "system": UCUM, "code": "/min"}),
     [("Observation.valueQuantity", "structure", "error")]),
    # the 85353-1 slice is 0..* in R4 4.0.1: only a warning
    ("panel-without-its-loinc-warns", "panel",
     setter("code", {"coding": [{"system": "http://example.org/codes", "code": "vitals"}]}),
     [("Observation.code", "value", "warning")]),
]  # fmt: skip

VALID_VARIANTS: list[tuple[str, str, Mutation]] = [
    ("official-heart-rate", "hr", lambda r: None),
    ("official-blood-pressure", "bp", lambda r: None),
    ("official-satO2-2708-6-plus-59408-5", "spo2", lambda r: None),
    ("temp-in-fahrenheit", "temp", setter("valueQuantity.code", "[degF]")),
    ("weight-in-grams", "weight", setter("valueQuantity.code", "g")),
    ("weight-in-pounds", "weight", setter("valueQuantity.code", "[lb_av]")),
    ("height-in-inches", "height", setter("valueQuantity.code", "[in_i]")),
    ("effective-period", "hr",
     chain(setter("effectiveDateTime", DELETE),
           setter("effectivePeriod", {"start": "1999-07-02"}))),
    ("no-value-but-absent-reason", "hr",
     chain(setter("valueQuantity", DELETE), setter("dataAbsentReason", DAR))),
    ("bp-component-absent-reason", "my-bp",
     chain(setter("component.1.valueQuantity", DELETE),
           setter("component.1.dataAbsentReason", DAR))),
    ("versioned-profile-claim", "hr", setter("meta.profile", [SD + "heartrate|4.0.1"])),
    ("subject-contained-patient", "hr",
     chain(setter("contained", [{"resourceType": "Patient", "id": "p"}]),
           setter("subject", {"reference": "#p"}))),
    ("subject-by-identifier-only", "hr",
     setter("subject", {"identifier": {"system": "urn:x", "value": "1"}})),
    ("my-bp", "my-bp", lambda r: None),
    ("my-panel", "panel", lambda r: None),
    ("bmi", "bmi", lambda r: None),
    ("head", "head", lambda r: None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("base", "mutate", "expected"),
    [pytest.param(b, m, e, id=i) for i, b, m, e in CASES],
)
def test_each_rule_fails_alone(
    base: str, mutate: Mutation, expected: list[tuple[str, str, str]]
) -> None:
    resource = BASES[base]()
    mutate(resource)
    issues = check_resource(resource, validator=VALIDATOR)
    assert located(issues) == expected
    assert len({i.diagnostics for i in issues}) == len(issues)


@pytest.mark.parametrize(
    ("base", "mutate"), [pytest.param(b, m, id=i) for i, b, m in VALID_VARIANTS]
)
def test_valid_variants_pass(base: str, mutate: Mutation) -> None:
    resource = BASES[base]()
    mutate(resource)
    assert check_resource(resource, validator=VALIDATOR) == []


def test_a_problem_both_checks_find_is_reported_once_in_structural_wording() -> None:
    hr = example("heart-rate")
    del hr["status"]
    assert check_vital_signs(hr)[0].diagnostics.endswith("(vital-signs profile)")
    issues = check_resource(hr, validator=VALIDATOR)
    assert [(i.expression, i.diagnostics) for i in issues] == [
        (("Observation.status",), "required element is missing")
    ]


def test_which_observations_are_vital_signs() -> None:
    survey: dict[str, Any] = {
        "resourceType": "Observation",
        "status": "final",
        "category": [{"coding": [{"code": "survey"}]}],
        "code": {"coding": [{"system": "urn:fhirbridge:CodeSystem:instrument", "code": "CAPS-5"}]},
    }
    assert not is_vital_signs(survey)
    assert check_vital_signs(survey) == []
    by_code = copy.deepcopy(survey)
    by_code["code"]["coding"].append({"system": LOINC, "code": "8867-4"})  # a vital sign code
    assert is_vital_signs(by_code)
    assert applicable_profiles(by_code) == [SD + "heartrate"]
    by_profile = copy.deepcopy(survey) | {"meta": {"profile": [SD + "vitalsigns|4.0.1"]}}
    assert is_vital_signs(by_profile) and applicable_profiles(by_profile) == []
    by_category = copy.deepcopy(survey) | {"category": [{"coding": [{"code": "vital-signs"}]}]}
    assert is_vital_signs(by_category)
    assert not is_vital_signs({"resourceType": "Patient", "code": survey["code"]})
    assert len(VITAL_SIGNS_PROFILES) == 11


def test_code_inferred_profile_applies_without_a_claim() -> None:
    """R4: an implementation representing a listed vital sign SHALL use its profile."""
    obs = vital("vitalsigns", "9279-1", 18, "/min")  # claims only the base profile
    obs["valueQuantity"]["code"] = "/h"
    assert located(check_vital_signs(obs)) == [
        ("Observation.valueQuantity.code", "code-invalid", "error")
    ]


def test_nominated_profile_is_applied() -> None:
    temp = example("body-temperature")  # claims only vitalsigns; its code makes it bodytemp
    issues = check_vital_signs(temp, nominated=[SD + "heartrate"])
    assert located(issues) == [
        ("Observation.code", "required", "error"),
        ("Observation.valueQuantity.code", "code-invalid", "error"),
    ]
    patient = {"resourceType": "Patient"}
    assert located(check_vital_signs(patient, nominated=[SD + "bp"])) == [
        ("Resource.resourceType", "invalid", "error")
    ]
    assert check_vital_signs(patient, nominated=["http://example.org/unknown"]) == []


def test_subject_resolved_through_a_resolver() -> None:
    obs = example("heart-rate")
    obs["subject"] = {"reference": "urn:uuid:0b0e"}
    assert check_vital_signs(obs, resolve={"urn:uuid:0b0e": "Patient"}.get) == []
    assert located(check_vital_signs(obs, resolve={"urn:uuid:0b0e": "Group"}.get)) == [
        ("Observation.subject.reference", "value", "error")
    ]
    assert check_vital_signs(obs) == []  # cannot tell: not judged


def test_malformed_shapes_are_left_to_the_structural_validator() -> None:
    obs = example("heart-rate")
    obs["category"] = "vital-signs"
    obs["code"] = {"coding": "8867-4"}
    obs["component"] = [1, "x"]
    obs["valueQuantity"] = ["not", "an", "object"]
    obs["subject"] = "Patient/example"
    # no crash; the claimed profile still says what it needs
    obs["meta"] = {"profile": [SD + "heartrate"]}
    assert located(check_vital_signs(obs)) == [
        ("Observation.category", "required", "error"),
        ("Observation.code", "required", "error"),
    ]
    obs["meta"] = {"profile": "x"}  # with every claim malformed, it is not a vital sign
    assert check_vital_signs(obs) == []


def test_messages_never_carry_instance_values() -> None:
    obs = bp()
    obs["status"] = SENTINEL
    obs["subject"] = {"reference": f"Group/{SENTINEL}"}
    obs["effectiveDateTime"] = SENTINEL
    obs["component"][1]["valueQuantity"] |= {"code": SENTINEL, "system": SENTINEL}
    obs["component"][0]["code"]["coding"][0]["code"] = SENTINEL
    obs["valueString"] = SENTINEL
    issues = check_resource(obs, validator=VALIDATOR)
    assert len(issues) >= 6
    assert SENTINEL not in repr(issues)
