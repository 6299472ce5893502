"""Terminology tables → FHIR R4 ConceptMaps (fhirbridge.fhir.conceptmap), on the shipped pack."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from fhirbridge.fhir.conceptmap import (
    collection_bundle,
    conceptmap_id,
    conceptmap_name,
    pack_conceptmaps,
    table_to_conceptmap,
    value_tables,
)
from fhirbridge.fhir.validate import OutputValidator
from fhirbridge.mapping.expr import Table
from fhirbridge.mapping.pack import MappingPack, load_pack

ROOT = Path(__file__).resolve().parents[2]
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
LOCAL = "urn:fhirbridge:CodeSystem"


@pytest.fixture(scope="module")
def pack() -> MappingPack:
    return load_pack(ROOT / "mappings")


@pytest.fixture(scope="module")
def maps(pack: MappingPack) -> dict[str, dict[str, Any]]:
    return {m["url"].rsplit(":", 1)[1]: m for m in pack_conceptmaps(pack)}


def _targets(conceptmap: dict[str, Any]) -> dict[tuple[str | None, str], list[dict[str, Any]]]:
    """(group target system, local code) → targets."""
    return {
        (group.get("target"), element["code"]): element["target"]
        for group in conceptmap["group"]
        for element in group["element"]
    }


def test_every_code_table_is_a_valid_r4_conceptmap(
    pack: MappingPack, maps: dict[str, dict[str, Any]]
) -> None:
    assert set(maps) == set(pack.tables) - {"encounter-status", "procedure-status"}
    assert value_tables(pack) == ["encounter-status", "procedure-status"]
    validator = OutputValidator()
    for table, conceptmap in maps.items():
        assert validator.validate(conceptmap) == [], table
        assert conceptmap["id"] == str(
            uuid.uuid5(uuid.UUID("5b2a7f0e-3c1d-5e8f-9a4b-6d7c8e9f0a1b"), f"conceptmap|{table}")
        )
        assert conceptmap["id"] == conceptmap_id(pack, table)
        assert conceptmap["url"] == f"urn:fhirbridge:ConceptMap:{table}"
        assert conceptmap["version"] == pack.version
        assert conceptmap["status"] == "active"
        # code systems go to the groups; there is no value set, so no source[x] / target[x]
        assert not {"sourceUri", "sourceCanonical", "targetUri", "targetCanonical"} & set(
            conceptmap
        )
        for group in conceptmap["group"]:
            assert group["source"] == pack.tables[table].source_system
            assert "unmapped" not in group  # unlisted terms stay text: no R4 mode says that
            for element in group["element"]:
                for target in element["target"]:
                    assert target["equivalence"] in ("equivalent", "wider")
                    assert "relationship" not in target  # R5 name
    bundle = collection_bundle(maps.values())
    assert validator.validate(bundle) == []
    assert [e["fullUrl"] for e in bundle["entry"]] == [f"urn:uuid:{m['id']}" for m in maps.values()]


def test_adverse_event_terms(maps: dict[str, dict[str, Any]]) -> None:
    conceptmap = maps["adverse-event-terms"]
    assert conceptmap["name"] == "AdverseEventTerms"
    assert conceptmap["title"] == "Adverse event terms"
    assert conceptmap["description"].startswith("Local adverse-event term → SNOMED CT finding.")
    assert "keeps it as text, never gives it a code" in conceptmap["purpose"]
    [group] = conceptmap["group"]
    assert group["source"] == f"{LOCAL}:adverse-event-term"
    assert group["target"] == SNOMED
    assert group["element"][0] == {
        "code": "nausea",
        "target": [{"code": "422587007", "display": "Nausea", "equivalence": "equivalent"}],
    }
    codes = {e["code"] for e in group["element"]}
    assert len(codes) == 13 and "muscle-tightness" not in codes


def test_rows_outside_the_table_target_system_get_their_own_group(
    maps: dict[str, dict[str, Any]],
) -> None:
    instruments = maps["instrument-score-code"]
    assert [g["target"] for g in instruments["group"]] == [LOINC, f"{LOCAL}:instrument"]
    targets = _targets(instruments)
    assert targets[(LOINC, "PCL-5")] == [{"code": "101698-9", "equivalence": "equivalent"}]
    assert targets[(f"{LOCAL}:instrument", "CAPS-5")][0]["code"] == "CAPS-5"
    assert (LOINC, "CAPS-5") not in targets


def test_codeable_concept_rows_map_to_each_coding(maps: dict[str, dict[str, Any]]) -> None:
    substance = maps["substance"]
    assert [g["target"] for g in substance["group"]] == [
        "http://fdasis.nlm.nih.gov",
        SNOMED,
        f"{LOCAL}:substance",
    ]
    mdma = [e for g in substance["group"] for e in g["element"] if e["code"] == "mdma"]
    assert [e["target"][0]["code"] for e in mdma] == ["KE1SEN21RM", "288459003"]
    assert {e["display"] for e in mdma} == {"MDMA (midomafetamine), investigational"}
    # placebo and blinded study drug never map to an MDMA code
    targets = _targets(substance)
    assert (SNOMED, "placebo") not in targets and (SNOMED, "blinded-study-drug") not in targets


def test_several_local_codes_on_one_target_are_wider(maps: dict[str, dict[str, Any]]) -> None:
    targets = _targets(maps["participation-type"])
    system = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
    assert targets[(system, "lead-therapist")][0]["equivalence"] == "equivalent"
    for role in ("physician", "nurse", "rater"):
        [target] = targets[(system, role)]
        assert target["code"] == "PART" and target["equivalence"] == "wider"
        assert target["comment"].startswith("3 local codes map to this code")


def _table(rows: dict[str, Any], **kw: Any) -> Table:
    return Table(name=kw.pop("name", "t"), file="terminology/t.yaml", rows=rows, lines={}, **kw)


def test_value_tables_and_plain_codes(pack: MappingPack) -> None:
    statuses = {"planned": "planned", "completed": "finished"}
    assert table_to_conceptmap(_table(statuses), pack) is None
    mapped = table_to_conceptmap(
        _table(statuses, target_system="http://hl7.org/fhir/encounter-status"), pack
    )
    assert mapped is not None
    assert "source" not in mapped["group"][0]  # no source_system declared
    assert mapped["group"][0]["target"] == "http://hl7.org/fhir/encounter-status"
    assert mapped["group"][0]["element"][1] == {
        "code": "completed",
        "target": [{"code": "finished", "equivalence": "equivalent"}],
    }
    assert OutputValidator().validate(mapped) == []
    # one row that is not a code makes the table a value table (never half a map)
    mixed = {"a": {"system": SNOMED, "code": "1"}, "b": 5}
    assert table_to_conceptmap(_table(mixed, target_system=SNOMED), pack) is None
    assert table_to_conceptmap(_table({"a": {"coding": [], "text": "x"}}), pack) is None


def test_coding_versions_and_names(pack: MappingPack) -> None:
    rows = {
        "a": {
            "system": SNOMED,
            "version": "http://snomed.info/sct/900000000000207008",
            "code": "1",
        },
        "b": {"system": SNOMED, "code": "2"},
    }
    conceptmap = table_to_conceptmap(
        _table(rows, name="9-lives", source_system=f"{LOCAL}:x", target_system=SNOMED), pack
    )
    assert conceptmap is not None
    assert [(g["target"], g.get("targetVersion")) for g in conceptmap["group"]] == [
        (SNOMED, "http://snomed.info/sct/900000000000207008"),
        (SNOMED, None),
    ]
    assert conceptmap["name"] == "Table9Lives"
    assert OutputValidator().validate(conceptmap) == []
    assert conceptmap_name("adverse-event-terms") == "AdverseEventTerms"


def test_deterministic(pack: MappingPack) -> None:
    again = load_pack(ROOT / "mappings")
    assert pack_conceptmaps(again) == pack_conceptmaps(pack)
