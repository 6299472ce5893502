"""`fhirbridge mappings export-conceptmaps`, and unmapped terms reported by `fhirbridge map`."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from fhirbridge.cli import main
from fhirbridge.fhir.conceptmap import pack_conceptmaps
from fhirbridge.fhir.validate import OutputValidator
from fhirbridge.mapping.pack import load_pack

ROOT = Path(__file__).resolve().parents[1]
MAPPINGS = ROOT / "mappings"
FIXTURE = MAPPINGS / "fixtures/medicine-session.in.json"
VALUE_TABLES = ("encounter-status", "procedure-status")


def test_export_to_stdout_is_a_valid_collection_bundle() -> None:
    result = CliRunner().invoke(main, ["mappings", "export-conceptmaps", str(MAPPINGS)])
    assert result.exit_code == 0, result.output
    bundle = json.loads(result.stdout)
    assert bundle["type"] == "collection"
    assert [e["resource"] for e in bundle["entry"]] == pack_conceptmaps(load_pack(MAPPINGS))
    assert OutputValidator().validate(bundle) == []
    for table in VALUE_TABLES:  # not dropped silently: named on stderr
        assert f"table {table} holds values, not codes: skipped" in result.stderr


def test_export_to_a_folder(tmp_path: Path) -> None:
    out = tmp_path / "new" / "maps"
    result = CliRunner().invoke(
        main, ["mappings", "export-conceptmaps", str(MAPPINGS), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"10 ConceptMaps written to {out}"
    expected = {m["url"].rsplit(":", 1)[1]: m for m in pack_conceptmaps(load_pack(MAPPINGS))}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"ConceptMap-{table}.json" for table in expected
    )
    for table, conceptmap in expected.items():
        assert json.loads((out / f"ConceptMap-{table}.json").read_text()) == conceptmap


def test_an_invalid_conceptmap_writes_nothing(tmp_path: Path) -> None:
    pack_dir = tmp_path / "mappings"
    shutil.copytree(MAPPINGS, pack_dir)
    route = pack_dir / "terminology/route.yaml"
    route.write_text(route.read_text().replace("  oral:", '  " oral":'))
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["mappings", "export-conceptmaps", str(pack_dir), "--out", str(out)]
    )
    assert result.exit_code == 1
    assert "error: terminology/route.yaml: ConceptMap ConceptMap.group[0].element[0].code" in (
        result.stderr
    )
    assert not out.exists()


def test_a_broken_pack_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["mappings", "export-conceptmaps", str(tmp_path)])
    assert result.exit_code == 2
    assert "pack.yaml not found" in result.stderr


def test_map_reports_an_unknown_term_keeps_it_as_text_and_never_codes_it() -> None:
    doc: dict[str, Any] = copy.deepcopy(json.loads(FIXTURE.read_text()))
    doc["adverseEvents"][1]["term"] = "jaw-clenching"  # replaces muscle-tightness
    result = CliRunner().invoke(main, ["map", "-"], input=json.dumps(doc))
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1
    assert "rule adverse-event" in notes[0]
    assert notes[0].endswith("a term is not in table adverse-event-terms; kept as text")
    assert "jaw-clenching" not in result.stderr  # the note names the table, never the value
    events = [
        e["resource"]
        for e in json.loads(result.stdout)["entry"]
        if e["resource"]["resourceType"] == "AdverseEvent"
    ]
    assert [e["event"] for e in events] == [
        {
            "coding": [
                {"system": "http://snomed.info/sct", "code": "422587007", "display": "Nausea"}
            ],
            "text": "nausea",
        },
        {"text": "jaw-clenching"},
    ]
