"""Golden tests: each fixture in the shipped pack maps to exactly its reviewed Bundle.

A mapping change must show up as a reviewed diff of the `.out.json` file. To re-record after
review: `fhirbridge mappings test --update`
(or FHIRBRIDGE_UPDATE_GOLDEN=1 pytest tests/test_golden.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fhirbridge.goldens import fixture_cases, run_case
from fhirbridge.mapping.pack import load_pack

PACK = load_pack(Path(__file__).resolve().parents[1] / "mappings")
CASES = fixture_cases(PACK)


@pytest.mark.parametrize("case", CASES, ids=[c.name.removesuffix(".in.json") for c in CASES])
def test_fixture_maps_to_its_golden_bundle(case: Path) -> None:
    result = run_case(PACK, case, update=os.environ.get("FHIRBRIDGE_UPDATE_GOLDEN") == "1")
    assert result.passed, result.diff or "\n".join(result.problems)


def test_there_is_at_least_one_fixture() -> None:
    assert CASES, "the shipped pack must carry golden fixtures"
