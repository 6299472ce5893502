"""Searches driven by a date or a reference read the partial indexes (migration 0003): the
plans of the statements `ResourceStore.search` really runs, on a migrated SQLite file that was
never ANALYZEd, and the answers they give."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from fhirbridge import db
from fhirbridge.store.query import parse_search
from fhirbridge.store.resources import ResourceStore

NOW = datetime(2026, 3, 1, tzinfo=UTC)


def _observation(oid: str, patient: str, when: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": when,
    }


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ResourceStore]:
    store = ResourceStore.from_url(f"sqlite:///{tmp_path / 'plans.db'}")
    db.upgrade(store)
    for n, (patient, when) in enumerate(
        [("p1", "2026-01-05"), ("p1", "2026-02-10"), ("p2", "2025-12-31"), ("p2", "2026-02-11")]
    ):
        store.save_submission(
            submission_id=f"s{n}",
            source="test",
            patient_id=patient,
            content_hash=f"h{n}",
            resources=[
                {"resourceType": "Patient", "id": patient},
                _observation(f"o{n}", patient, when),
            ],
            summary={},
            now=NOW,
        )
    yield store
    store.close()


def _search(store: ResourceStore, items: list[tuple[str, str]]) -> tuple[list[str], str]:
    """The ids found, and the plans of every SELECT the search ran."""
    reads: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        reads.append((statement, params))

    event.listen(store.engine, "before_cursor_execute", capture)
    try:
        page = store.search("Observation", parse_search("Observation", items))
    finally:
        event.remove(store.engine, "before_cursor_execute", capture)
    with store.engine.connect() as conn:
        plans = " | ".join(
            row[3]
            for sql, params in reads
            if sql.lstrip().upper().startswith("SELECT")
            for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params)
        )
    return sorted(e.id for e in page.entries), plans


@pytest.mark.parametrize(
    ("items", "found", "index"),
    [
        (
            [("date", "ge2026-01-01")],
            ["o0", "o1", "o3"],
            "ix_fhir_search_index_resource_type_param_date",
        ),
        ([("date", "lt2026-01-01")], ["o2"], "ix_fhir_search_index_resource_type_param_date"),
        (
            [("date", "ne2026-01-05")],
            ["o1", "o2", "o3"],
            "ix_fhir_search_index_resource_type_param_date",
        ),
        ([("subject", "Patient/p1")], ["o0", "o1"], "ix_fhir_search_index_ref_resource_type_param"),
        (
            [("subject", "Patient/p2"), ("date", "ge2026-01-01")],
            ["o3"],
            "ix_fhir_search_index_ref_resource_type_param",
        ),
    ],
)
def test_date_and_reference_searches_use_the_partial_indexes(
    store: ResourceStore, items: list[tuple[str, str]], found: list[str], index: str
) -> None:
    ids, plans = _search(store, items)
    assert ids == found
    assert f"USING INDEX {index}" in plans or f"USING COVERING INDEX {index}" in plans, plans
