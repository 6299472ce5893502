"""Capabilities: shipped profiles encode REFERENCE.md §4-5; `auto` reads a CapabilityStatement."""

from __future__ import annotations

import copy
from importlib import resources
from typing import Any

import pytest
import yaml

from fhirbridge.api.fhir import capability_statement
from fhirbridge.sync.capabilities import (
    NO_IDENTIFIER_SEARCH,
    PROFILES,
    CapabilityError,
    TypeCaps,
    from_capability_statement,
    load_profile,
    parse_profile,
)

WE_PRODUCE = (
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
)


def test_profiles_ship_as_package_data():
    files = {p.name for p in (resources.files("fhirbridge.sync") / "profiles").iterdir()}
    assert {f"{name}.yaml" for name in PROFILES} <= files


@pytest.mark.parametrize("name", PROFILES)
def test_every_profile_loads_and_cites_its_source(name):
    caps = load_profile(name)
    assert caps.name == name
    assert caps.source
    text = (resources.files("fhirbridge.sync") / "profiles" / f"{name}.yaml").read_text()
    assert text.startswith("# Profile")  # a comment block explains where the facts come from


@pytest.mark.parametrize("name", PROFILES)
def test_no_profile_lets_adverse_event_or_provenance_be_searched(name):
    caps = load_profile(name)
    for rtype in NO_IDENTIFIER_SEARCH:
        assert not caps.of(rtype).search_identifier
        assert not caps.of(rtype).conditional_create


# --------------------------------------------------------------------------- generic-r4


def test_generic_r4_is_a_full_server():
    caps = load_profile("generic-r4")
    assert caps.transaction and caps.batch and caps.versioned_update
    assert not caps.requires_existing_encounter
    for rtype in WE_PRODUCE:
        assert caps.of(rtype).update_create, rtype
        assert caps.of(rtype).update and caps.of(rtype).create
    for rtype in ("Patient", "Observation", "Encounter", "MedicationAdministration"):
        assert caps.of(rtype) == TypeCaps.full()
    assert caps.of("DocumentReference") == TypeCaps.full()  # unlisted: everything
    assert caps.of("AdverseEvent") == TypeCaps(
        read=True, create=True, update=True, update_create=True
    )


# --------------------------------------------------------------------------- epic


def test_epic_encodes_reference_section_4_and_5():
    caps = load_profile("epic")
    assert not caps.transaction and not caps.batch
    assert caps.requires_existing_encounter
    assert not caps.versioned_update
    # "advertises create only on" these eleven (REFERENCE.md §4); "11 ... created and 7 updated"
    creatable = {t for t in caps.types if caps.of(t).create}
    assert creatable == {
        "AllergyIntolerance",
        "BodyStructure",
        "Communication",
        "ConceptMap",
        "Condition",
        "DocumentReference",
        "Observation",
        "Patient",
        "Procedure",
        "QuestionnaireResponse",
        "ServiceRequest",
    }
    assert len({t for t in caps.types if caps.of(t).update}) == 7
    for rtype in (
        "AdverseEvent",
        "MedicationAdministration",
        "MedicationRequest",
        "Encounter",
        "EpisodeOfCare",
        "CarePlan",
        "Consent",
    ):
        assert caps.of(rtype).read and not caps.of(rtype).writable, rtype
        assert not caps.of(rtype).update
    # updateCreate false and conditionalCreate false on every resource
    for rtype in caps.types:
        assert not caps.of(rtype).update_create and not caps.of(rtype).conditional_create
    assert caps.of("Observation").update and caps.of("Procedure").update
    assert not caps.of("Patient").update
    assert caps.of("SomethingElse") == TypeCaps()


# --------------------------------------------------------------------------- oracle-health


def test_oracle_health_encodes_reference_section_4_and_5():
    caps = load_profile("oracle-health")
    assert caps.batch and not caps.transaction
    assert caps.versioned_update  # ETag / If-Match, 409 on a stale version
    assert not caps.requires_existing_encounter
    assert "AdverseEvent" not in caps.types  # not offered at all
    assert caps.of("AdverseEvent") == TypeCaps()
    for rtype in ("MedicationAdministration", "Consent"):
        assert caps.of(rtype).read and not caps.of(rtype).writable
    for rtype in ("Encounter", "Observation", "Procedure", "MedicationRequest", "Provenance"):
        assert caps.of(rtype).create, rtype
    for rtype in caps.types:  # no conditional create, PUT does not upsert
        assert not caps.of(rtype).conditional_create and not caps.of(rtype).update_create
    assert caps.of("Observation").update and not caps.of("Procedure").update
    # identifier search only where the capture lists the parameter
    assert caps.of("Patient").search_identifier and caps.of("Encounter").search_identifier
    assert not caps.of("Observation").search_identifier


# --------------------------------------------------------------------------- parse_profile


def _profile(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"name": "x", "types": {"Observation": ["read", "create"]}}
    data.update(overrides)
    return data


def test_parse_profile_applies_r4_facts_over_the_file():
    caps = parse_profile(_profile(types={"AdverseEvent": ["search_identifier", "create"]}), "x")
    assert caps.of("AdverseEvent") == TypeCaps(create=True)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "must be a mapping"),
        (_profile(name="y"), "'name' must be 'x'"),
        (_profile(colour=1), "unknown keys colour"),
        (_profile(batch="yes"), "batch must be true or false"),
        (_profile(types={"Observation": ["write"]}), "unknown capability write"),
        (_profile(types={"Observation": "read"}), "types.Observation must be a list"),
        (_profile(types=[]), "types must be a mapping"),
        (_profile(unlisted="read"), "unlisted must be a list"),
        (_profile(notes=[1]), "notes must be a list of strings"),
    ],
)
def test_parse_profile_errors(data, message):
    with pytest.raises(CapabilityError, match=message):
        parse_profile(data, "x")


def test_load_profile_unknown():
    with pytest.raises(CapabilityError, match="no shipped profile"):
        load_profile("cerner")


def test_profile_files_are_plain_yaml_with_known_keys():
    for name in PROFILES:
        text = (resources.files("fhirbridge.sync") / "profiles" / f"{name}.yaml").read_text()
        assert parse_profile(yaml.safe_load(text), name) == load_profile(name)


# --------------------------------------------------------------------------- auto


def _resource(rtype: str, *codes: str, **extra: Any) -> dict[str, Any]:
    return {"type": rtype, "interaction": [{"code": c} for c in codes], **extra}


HAPI_LIKE: dict[str, Any] = {
    "resourceType": "CapabilityStatement",
    "status": "active",
    "kind": "instance",
    "fhirVersion": "4.0.1",
    "software": {"name": "HAPI FHIR Server", "version": "7.4.0"},
    "rest": [
        {"mode": "client"},
        {
            "mode": "server",
            "interaction": [{"code": "transaction"}, {"code": "batch"}],
            "resource": [
                _resource(
                    "Patient",
                    "read",
                    "search-type",
                    "create",
                    "update",
                    updateCreate=True,
                    conditionalCreate=True,
                    versioning="versioned-update",
                    searchParam=[{"name": "identifier", "type": "token"}],
                ),
                _resource(
                    "Observation",
                    "read",
                    "search-type",
                    "create",
                    "update",
                    updateCreate=True,
                    conditionalCreate=True,
                    versioning="versioned-update",
                ),
                _resource(
                    "AdverseEvent",
                    "read",
                    "search-type",
                    "create",
                    "update",
                    updateCreate=True,
                    conditionalCreate=True,
                    versioning="versioned-update",
                ),
                _resource(
                    "Medication",
                    "read",
                    "search-type",
                    "create",
                    "update",
                    updateCreate=True,
                    conditionalCreate=True,
                    versioning="versioned-update",
                    searchParam=[{"name": "code", "type": "token"}],
                ),
            ],
        },
    ],
}


def test_auto_reads_a_full_server():
    caps = from_capability_statement(HAPI_LIKE)
    assert caps.name == "auto"
    assert caps.transaction and caps.batch and caps.versioned_update
    assert not caps.requires_existing_encounter
    assert caps.of("Patient") == TypeCaps.full()
    assert caps.of("Observation") == TypeCaps.full()  # no searchParam list: R4 has identifier
    # lists its parameters, and identifier is not among them
    assert caps.of("Medication") == TypeCaps(
        read=True, create=True, update=True, update_create=True, conditional_create=True
    )
    # advertised, but R4 AdverseEvent has no identifier search parameter
    assert caps.of("AdverseEvent") == TypeCaps(
        read=True, create=True, update=True, update_create=True
    )
    assert "HAPI FHIR Server 7.4.0" in caps.notes[0]


def test_auto_unlisted_types_get_what_every_listed_type_supports():
    # sekmet-fhir lists 53 types with full support but not AdverseEvent, which it stores.
    cs = copy.deepcopy(HAPI_LIKE)
    server = cs["rest"][1]
    server["resource"] = [r for r in server["resource"] if r["type"] in ("Patient", "Observation")]
    caps = from_capability_statement(cs)
    assert caps.of("QuestionnaireResponse") == TypeCaps.full()
    assert caps.of("AdverseEvent") == TypeCaps(
        read=True, create=True, update=True, update_create=True
    )


def test_auto_reads_a_selective_vendor_server():
    cs = {
        "resourceType": "CapabilityStatement",
        "rest": [
            {
                "mode": "server",
                "resource": [
                    _resource(
                        "Observation",
                        "create",
                        "read",
                        "search-type",
                        "update",
                        updateCreate=False,
                        conditionalCreate=False,
                        searchParam=[{"name": "identifier", "type": "token"}],
                    ),
                    _resource("Encounter", "read", "search-type", updateCreate=False),
                    _resource("Provenance", "read"),
                ],
            }
        ],
    }
    caps = from_capability_statement(cs)
    assert not caps.transaction and not caps.batch and not caps.versioned_update
    assert caps.of("Observation") == TypeCaps(
        read=True, search_identifier=True, create=True, update=True
    )
    assert caps.of("Encounter") == TypeCaps(read=True, search_identifier=True)
    # unlisted on a selective server: only what every listed type allows (read), no writes
    assert caps.of("AdverseEvent") == TypeCaps(read=True)
    assert not caps.of("Patient").writable


def test_auto_versioned_update_needs_every_updatable_type():
    cs = copy.deepcopy(HAPI_LIKE)
    cs["rest"][1]["resource"][1]["versioning"] = "versioned"
    assert not from_capability_statement(cs).versioned_update


def test_auto_on_fhirbridges_own_metadata_is_read_only():
    caps = from_capability_statement(capability_statement("https://fhirbridge.example.org/fhir"))
    assert not caps.transaction and not caps.batch and not caps.versioned_update
    assert caps.types
    for rtype in caps.types:
        tc = caps.of(rtype)
        assert tc.read and not tc.writable and not tc.update
    assert caps.of("Observation").search_identifier
    assert not caps.of("AdverseEvent").search_identifier


@pytest.mark.parametrize(
    ("cs", "message"),
    [
        ({"resourceType": "Patient"}, "not a CapabilityStatement"),
        ({"resourceType": "CapabilityStatement"}, "no rest entry"),
        ({"resourceType": "CapabilityStatement", "rest": [{"mode": "client"}]}, "no rest entry"),
    ],
)
def test_auto_rejects_what_is_not_a_server_statement(cs, message):
    with pytest.raises(CapabilityError, match=message):
        from_capability_statement(cs)


def test_to_dict_is_json_shaped():
    data = load_profile("epic").to_dict()
    assert data["name"] == "epic"
    assert data["types"]["Observation"] == ["read", "search_identifier", "create", "update"]
    assert data["requiresExistingEncounter"] is True
