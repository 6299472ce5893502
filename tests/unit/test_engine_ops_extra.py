"""Operators added to the mapping language after the first release, table-driven.

`$number`: the number a decimal text stands for (exports such as REDCap's JSON carry every value
as text), read as JSON reads it: a whole number → int, anything with a point or exponent → float.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from fhirbridge.errors import MappingConfigError
from fhirbridge.mapping.check import check_pack
from fhirbridge.mapping.engine import map_submission
from fhirbridge.mapping.pack import load_pack
from tests.unit.packs import patient_rule, write_pack

NOW = datetime(2026, 11, 25, 4, 0, 0, tzinfo=UTC)
_MISSING = object()


def _number_of(tmp_path: Path, value: Any) -> Any:
    """Map {$number: $.x} with patient.x = value; _MISSING when the element was pruned."""
    pack = load_pack(write_pack(tmp_path, [patient_rule({"gender": {"$number": "$.x"}})]))
    patient: dict[str, Any] = {"id": "p1"}
    if value is not _MISSING:
        patient["x"] = value
    resource = map_submission(pack, {"source": "s", "patient": patient}, now=NOW).resources[0]
    return resource.get("gender", _MISSING)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # whole numbers become ints, as JSON reads "80"
        ("80", 80),
        ("0", 0),
        ("-5", -5),
        ("+3", 3),
        ("080", 80),  # REDCap's integer validation allows leading zeros
        # a point or an exponent makes a float, as JSON reads "80.0"
        ("36.7", 36.7),
        ("80.0", 80.0),
        ("-0.25", -0.25),
        (".5", 0.5),
        ("5.", 5.0),
        ("1e3", 1000.0),
        ("2.5E-1", 0.25),
        # numbers pass through untouched
        (42, 42),
        (2.5, 2.5),
        # anything else is null (and pruned): the source schema's pattern should reject it
        ("", _MISSING),
        (" 7", _MISSING),
        ("7 ", _MISSING),
        ("7 mg", _MISSING),
        ("1,5", _MISSING),  # comma decimals are not read
        ("1.2.3", _MISSING),
        ("-", _MISSING),
        (".", _MISSING),
        ("0x1A", _MISSING),
        ("NaN", _MISSING),
        ("Infinity", _MISSING),
        ("1e999", _MISSING),  # not finite
        ("9" * 5000, _MISSING),  # beyond Python's int-from-text limit
        ("٣", _MISSING),  # only ASCII digits
        (True, _MISSING),
        (False, _MISSING),
        (["1"], _MISSING),
        ({"v": "1"}, _MISSING),
        (None, _MISSING),
        (_MISSING, _MISSING),
    ],
)
def test_number(tmp_path: Path, value: Any, expected: Any) -> None:
    got = _number_of(tmp_path, value)
    assert got == expected
    assert type(got) is type(expected)  # 80 and 80.0 serialize differently


def test_number_takes_no_options(tmp_path: Path) -> None:
    rule = patient_rule({"gender": {"$number": "$.x", "default": 0}})
    with pytest.raises(MappingConfigError, match=r"\$number does not take `default`"):
        load_pack(write_pack(tmp_path, [rule]))


def test_number_argument_is_checked_against_the_source_schema(tmp_path: Path) -> None:
    pack = load_pack(write_pack(tmp_path, [patient_rule({"gender": {"$number": "$.idd"}})]))
    messages = [f.message for f in check_pack(pack).errors]
    assert any("source field 'idd' does not exist" in m for m in messages), messages
