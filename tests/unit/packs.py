"""Build small mapping packs on disk for tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

MINIMAL_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["source", "patient"],
    "properties": {
        "source": {"type": "string"},
        "patient": {"type": "object", "properties": {"id": {"type": "string"}}},
        "items": {"type": "array"},
    },
}


def write_pack(
    root: Path,
    rules: list[dict[str, Any]] | str,
    tables: dict[str, dict[str, Any]] | None = None,
    manifest: dict[str, Any] | None = None,
) -> Path:
    """A pack with one rule file (rules may be raw YAML text) and the given tables."""
    (root / "rules").mkdir(parents=True, exist_ok=True)
    (root / "terminology").mkdir(exist_ok=True)
    (root / "source.schema.json").write_text(json.dumps(MINIMAL_SCHEMA))
    text = rules if isinstance(rules, str) else yaml.safe_dump({"rules": rules}, sort_keys=False)
    (root / "rules" / "r.yaml").write_text(text)
    for name, table in (tables or {}).items():
        (root / "terminology" / f"{name}.yaml").write_text(
            yaml.safe_dump({"table": name, "rows": table}, sort_keys=False)
        )
    pack = {
        "name": "test-pack",
        "version": 1,
        "source_schema": "source.schema.json",
        "identity": {
            "namespace": "12345678-1234-5678-1234-567812345678",
            "system": "urn:test:{source}:{kind}",
            "source": "$.source",
            "patient": "$.patient.id",
        },
        "constants": {"sys": "http://example.org/cs"},
        "tables": ["terminology/*.yaml"],
        "rules": ["rules/r.yaml"],
    }
    pack.update(manifest or {})
    (root / "pack.yaml").write_text(yaml.safe_dump(pack, sort_keys=False))
    return root


def patient_rule(template: dict[str, Any], **extra: Any) -> dict[str, Any]:
    rule = {
        "name": "pat",
        "resource": "Patient",
        "for_each": "$.patient",
        "identity": {"kind": "patient", "key": "$.id"},
        "template": template,
    }
    rule.update(extra)
    return rule
