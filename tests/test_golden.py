"""Golden tests: each fixture in the pack maps to exactly its reviewed Bundle.

A mapping change must show up as a reviewed diff of the `.out.json` file. To re-record after
review: FHIRBRIDGE_UPDATE_GOLDEN=1 pytest tests/test_golden.py
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fhirbridge.fhir.bundle import transaction_bundle
from fhirbridge.fhir.validate import OutputValidator
from fhirbridge.mapping.pack import load_pack
from fhirbridge.pipeline import transform
from fhirbridge.validation import SubmissionValidator

PACK_DIR = Path(__file__).resolve().parents[1] / "mappings"
PACK = load_pack(PACK_DIR)
# The clock is an input of the pure pipeline, so the only time-dependent element
# (Provenance.recorded) is fixed by design, not masked.
NOW = datetime(2026, 11, 25, 0, 0, 0, tzinfo=UTC)
CASES = sorted((PACK_DIR / "fixtures").glob("*.in.json"))


@pytest.mark.parametrize("case", CASES, ids=[c.name.removesuffix(".in.json") for c in CASES])
def test_fixture_maps_to_its_golden_bundle(case: Path) -> None:
    validator = OutputValidator()
    result = transform(
        json.loads(case.read_text()),
        pack=PACK,
        input_validator=SubmissionValidator(PACK.source_schema, PACK.integrity),
        output_validator=validator,
        now=NOW,
    )
    bundle = transaction_bundle(result.resources)
    golden = case.with_name(case.name.replace(".in.json", ".out.json"))
    if os.environ.get("FHIRBRIDGE_UPDATE_GOLDEN") == "1":
        golden.write_text(json.dumps(bundle, indent=2, ensure_ascii=False) + "\n")
    assert golden.exists(), f"no golden file {golden.name}: run with FHIRBRIDGE_UPDATE_GOLDEN=1"
    assert bundle == json.loads(golden.read_text())
    # The Bundle itself is valid R4 too, not only its entries.
    assert validator.validate(bundle) == []


def test_there_is_at_least_one_fixture() -> None:
    assert CASES, "the shipped pack must carry golden fixtures"
