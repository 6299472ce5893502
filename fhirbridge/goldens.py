"""Golden fixtures of a mapping pack: map each `<case>.in.json`, compare with `<case>.out.json`.

The clock is an input of the pipeline, so the one time-dependent element (Provenance.recorded)
is fixed by design (GOLDEN_NOW) instead of being masked; ids are deterministic already.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fhirbridge.errors import FhirbridgeError
from fhirbridge.fhir.bundle import transaction_bundle
from fhirbridge.fhir.validate import OutputValidator
from fhirbridge.mapping.pack import MappingPack
from fhirbridge.pipeline import transform
from fhirbridge.validation import SubmissionValidator

GOLDEN_NOW = datetime(2026, 11, 25, 0, 0, 0, tzinfo=UTC)


@dataclass
class CaseResult:
    """The outcome of one fixture: passed, or what went wrong (diff, issues)."""

    name: str
    passed: bool
    updated: bool = False
    diff: str = ""
    problems: tuple[str, ...] = ()


def fixture_cases(pack: MappingPack) -> list[Path]:
    if pack.fixtures_dir is None or not pack.fixtures_dir.is_dir():
        return []
    return sorted(pack.fixtures_dir.glob("*.in.json"))


def expected_path(case: Path) -> Path:
    return case.with_name(case.name.removesuffix(".in.json") + ".out.json")


def _dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def run_case(
    pack: MappingPack, case: Path, *, update: bool = False, validator: OutputValidator | None = None
) -> CaseResult:
    """Map one fixture, validate every output resource, compare (or re-record) its Bundle."""
    name = case.name.removesuffix(".in.json")
    validator = validator or OutputValidator()
    try:
        result = transform(
            json.loads(case.read_text(encoding="utf-8")),
            pack=pack,
            input_validator=SubmissionValidator(pack.source_schema, pack.integrity),
            output_validator=validator,
            now=GOLDEN_NOW,
        )
    except FhirbridgeError as exc:
        return CaseResult(
            name,
            False,
            problems=tuple(
                f"{', '.join(i.expression) or '-'}: {i.diagnostics}" for i in exc.issues
            ),
        )
    except json.JSONDecodeError as exc:
        return CaseResult(name, False, problems=(f"malformed JSON at line {exc.lineno}",))
    bundle = transaction_bundle(result.resources)
    bundle_issues = tuple(
        f"{', '.join(i.expression)}: {i.diagnostics}" for i in validator.validate(bundle)
    )
    if bundle_issues:
        return CaseResult(name, False, problems=bundle_issues)
    golden = expected_path(case)
    actual = _dump(bundle)
    if update:
        changed = not golden.exists() or golden.read_text(encoding="utf-8") != actual
        if changed:
            golden.write_text(actual, encoding="utf-8")
        return CaseResult(name, True, updated=changed)
    if not golden.exists():
        return CaseResult(
            name,
            False,
            problems=(f"no {golden.name}: review the output and record it with --update",),
        )
    expected = golden.read_text(encoding="utf-8")
    if json.loads(expected) == bundle:
        return CaseResult(name, True)
    return CaseResult(
        name, False, diff="".join(_readable_diff(json.loads(expected), bundle, golden.name))
    )


def _readable_diff(expected: dict[str, Any], actual: dict[str, Any], label: str) -> Iterator[str]:
    """A unified diff per resource (matched by type/id), so a change reads as FHIR, not noise."""

    def by_key(bundle: dict[str, Any]) -> dict[str, Any]:
        return {
            f"{e['resource']['resourceType']}/{e['resource']['id']}": e["resource"]
            for e in bundle.get("entry", [])
        }

    old, new = by_key(expected), by_key(actual)
    for key in [*old, *[k for k in new if k not in old]]:
        a = _dump(old[key]).splitlines(keepends=True) if key in old else []
        b = _dump(new[key]).splitlines(keepends=True) if key in new else []
        if a != b:
            yield from difflib.unified_diff(a, b, f"{label} {key}", f"mapped {key}", n=2)
    if list(old) != list(new) and set(old) == set(new):
        yield f"--- {label}: same resources in a different order\n"
