"""Pure parts of the store: FHIR date ranges, index extraction, parameter table, escapes."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from fhirbridge.store.fhirdates import (
    MAX_US,
    MIN_US,
    format_instant,
    micros,
    micros_to_datetime,
    parse_range,
)
from fhirbridge.store.query import parse_search, split_escaped
from fhirbridge.store.search_params import (
    PARAMS,
    REFERENCE_ROW,
    SUPPORTED_TYPES,
    IndexRow,
    compartment_params,
    extract_index,
    params_for,
    parse_reference,
)
from tests.store import data as d


def _us(y: int, m: int, d: int, hh: int = 0, mi: int = 0, ss: int = 0, us: int = 0) -> int:
    return micros(datetime(y, m, d, hh, mi, ss, us, tzinfo=UTC))


@pytest.mark.parametrize(
    ("text", "lo", "hi"),
    [
        ("2026", _us(2026, 1, 1), _us(2027, 1, 1) - 1),
        ("2024-02", _us(2024, 2, 1), _us(2024, 3, 1) - 1),  # leap year
        ("2026-12-31", _us(2026, 12, 31), _us(2027, 1, 1) - 1),
        ("2026-03-01T10:15Z", _us(2026, 3, 1, 10, 15), _us(2026, 3, 1, 10, 16) - 1),
        ("2026-03-01T10:15:30+02:00", _us(2026, 3, 1, 8, 15, 30), _us(2026, 3, 1, 8, 15, 31) - 1),
        ("2026-03-01T00:30:00-05:30", _us(2026, 3, 1, 6, 0), _us(2026, 3, 1, 6, 0, 1) - 1),
        (
            "2026-03-01T10:15:30.1Z",
            _us(2026, 3, 1, 10, 15, 30, 100000),
            _us(2026, 3, 1, 10, 15, 30, 199999),
        ),
        (
            "2026-03-01T10:15:30.123456789Z",
            _us(2026, 3, 1, 10, 15, 30, 123456),
            _us(2026, 3, 1, 10, 15, 30, 123456),
        ),
        ("2026-03-01T10:15:30", _us(2026, 3, 1, 10, 15, 30), _us(2026, 3, 1, 10, 15, 31) - 1),
        (
            "0001-01-01T00:00:00+14:00",
            _us(1, 1, 1) - 14 * 3600 * 10**6,
            _us(1, 1, 1) - 14 * 3600 * 10**6 + 10**6 - 1,
        ),
    ],
)
def test_parse_range(text: str, lo: int, hi: int) -> None:
    assert parse_range(text) == (lo, hi)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "26",
        "2026-1",
        "2026-00",
        "2026-02-29",
        "0000",
        "2026-03-01T24:00:00Z",
        "2026-03-01T10:60Z",
        "2026-03-01T10:00:61Z",
        "2026-03-01T10:00:00+15:00",
        "2026-03-01T10:00:00+01",
        "2026-03-01 10:00:00Z",
        "2026-03-01T",
        "٢٠٢٦",
    ],
)
def test_parse_range_rejects(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_range(text)
    assert text not in str(info.value) or not text


def test_instants() -> None:
    now = datetime(2026, 11, 25, 4, 40, 12, 123987, tzinfo=UTC)
    assert format_instant(micros(now)) == "2026-11-25T04:40:12.123+00:00"
    assert micros_to_datetime(micros(now)) == now
    with pytest.raises(ValueError):
        micros(datetime(2026, 1, 1))


def test_extract_index_of_an_observation() -> None:
    rows = extract_index(d.blood_pressure())
    by_param: dict[str, list[IndexRow]] = {}
    for row in rows:
        by_param.setdefault(row.param, []).append(row)
    assert by_param["code"] == [IndexRow("code", system=d.LOINC, value="85354-9")]
    assert by_param["category"] == [
        IndexRow("category", system=d.OBS_CATEGORY, value="vital-signs")
    ]
    assert by_param["identifier"] == [IndexRow("identifier", system="urn:obs", value="BP-1")]
    patient_ref = f"Patient/{d.PATIENT}"
    assert by_param["patient"] == [IndexRow("patient", value=d.PATIENT, ref=patient_ref)]
    assert by_param["subject"] == [IndexRow("subject", value=d.PATIENT, ref=patient_ref)]
    assert by_param["encounter"] == [
        IndexRow("encounter", value=d.ENCOUNTER, ref=f"Encounter/{d.ENCOUNTER}")
    ]
    assert by_param["date"] == [
        IndexRow("date", date_lo=_us(2026, 3, 1, 23, 30), date_hi=_us(2026, 3, 2, 0, 30, 1) - 1)
    ]
    assert {(r.system, r.value) for r in by_param[REFERENCE_ROW]} == {
        ("Patient", d.PATIENT),
        ("Encounter", d.ENCOUNTER),
    }


def test_extract_index_shapes() -> None:
    episode = extract_index(d.episode())
    assert IndexRow("date", date_lo=_us(2026, 2, 1), date_hi=MAX_US) in episode
    ended = {**d.episode(), "period": {"end": "2026-02"}}
    assert IndexRow("date", date_lo=MIN_US, date_hi=_us(2026, 3, 1) - 1) in extract_index(ended)
    # references of the wrong type are not indexed for `patient`, and odd values are skipped
    odd = {
        **d.heart_rate(),
        "subject": {"reference": "Group/g1"},
        "effectiveDateTime": "not a date",
        "category": [{"text": "no coding"}],
        "performer": [{"reference": "#contained"}, {"reference": "urn:uuid:abc"}],
    }
    params = {row.param for row in extract_index(odd)}
    assert "patient" not in params
    assert "date" not in params
    assert "category" not in params
    assert "subject" in params
    refs = {row.ref for row in extract_index(odd) if row.param == REFERENCE_ROW}
    assert refs == {"Group/g1", f"Encounter/{d.ENCOUNTER}"}
    # AdverseEvent.identifier is a single Identifier; MedicationAdministration.medicationReference
    # is not a `code`
    assert IndexRow("identifier", system="urn:ae", value="AE-1") in extract_index(d.adverse_event())
    assert "code" not in {r.param for r in extract_index(d.administration_by_reference())}
    assert [r.param for r in extract_index({"resourceType": "Basic", "id": "x"})] == []


def test_parameter_table() -> None:
    assert set(SUPPORTED_TYPES) == {
        "AdverseEvent",
        "AuditEvent",
        "Encounter",
        "EpisodeOfCare",
        "Medication",
        "MedicationAdministration",
        "Observation",
        "Patient",
        "Practitioner",
        "Procedure",
        "Provenance",
    }
    for rtype in SUPPORTED_TYPES:
        names = [p.name for p in PARAMS[rtype]]
        assert len(names) == len(set(names)), rtype
        assert {"_id", "_lastUpdated"} <= set(params_for(rtype))
        for sp in PARAMS[rtype]:
            assert sp.paths and sp.documentation
            assert sp.definition is None or sp.definition.startswith(
                "http://hl7.org/fhir/SearchParameter/"
            )
    assert params_for("Basic") == {}
    assert compartment_params() == {
        "AdverseEvent": ("subject",),
        "Encounter": ("patient",),
        "EpisodeOfCare": ("patient",),
        "MedicationAdministration": ("patient",),
        "Observation": ("patient",),
        "Procedure": ("patient",),
        "Provenance": ("patient",),
    }


@pytest.mark.parametrize(
    ("reference", "parsed"),
    [
        ("Patient/123", ("Patient", "123")),
        ("https://x.org/fhir/Patient/a-1.b", ("Patient", "a-1.b")),
        ("Patient/123/_history/4", ("Patient", "123")),
        ("#p1", None),
        ("urn:uuid:6f1c1c2e-0c7a-4d5e-9a51-1d2f3a4b5c01", None),
        ("Patient/", None),
        ("patient/1", None),
    ],
)
def test_parse_reference(reference: str, parsed: tuple[str, str] | None) -> None:
    assert parse_reference(reference) == parsed


def test_split_escaped() -> None:
    assert split_escaped(r"a,b\,c", ",") == ["a", "b,c"]
    assert split_escaped(r"s\|x|c", "|") == ["s|x", "c"]
    assert split_escaped(r"a\\,b", ",") == ["a\\\\", "b"]  # escaped backslash stays for later
    assert split_escaped(r"a\$b\q", "") == [r"a$b\q"]


def test_link_params_keep_what_was_used() -> None:
    query = parse_search(
        "Observation",
        [("code", "x"), ("bogus", "1"), ("_sort", "-date"), ("_count", "5"), ("_offset", "10")],
    )
    assert query.link_params() == [
        ("code", "x"),
        ("_sort", "-date"),
        ("_count", "5"),
        ("_offset", "10"),
    ]
    assert query.link_params(0) == [("code", "x"), ("_sort", "-date"), ("_count", "5")]


def test_seed_resources_are_valid_r4() -> None:
    r4b = pytest.importorskip("fhir.resources.R4B")
    for resource in [*d.everything_for_patient(), d.other_observation()]:
        r4b.get_fhir_model_class(resource["resourceType"]).model_validate(resource)
