"""Query plans on a migrated SQLite file that was never ANALYZEd, read from the statements the
code really runs, with the answers they give: searches driven by a date or a reference use the
partial indexes (migration 0003); the console's newest submissions, received_at (0004); a
claim reads the open deliveries only, however many are settled (0005)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, update

from fhirbridge import db
from fhirbridge.store.query import parse_search
from fhirbridge.store.resources import ResourceStore
from fhirbridge.store.schema import delivery
from fhirbridge.sync.outbox import Outbox, Route
from fhirbridge.ui.queries import recent_submissions

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
            now=NOW.replace(minute=n),
        )
    yield store
    store.close()


@contextmanager
def _plans(store: ResourceStore) -> Iterator[list[str]]:
    """Collects the plan of every SELECT run inside the block (filled in when it ends)."""
    reads: list[tuple[str, Any]] = []
    plans: list[str] = []

    def capture(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            reads.append((statement, params))

    event.listen(store.engine, "before_cursor_execute", capture)
    try:
        yield plans
    finally:
        event.remove(store.engine, "before_cursor_execute", capture)
    with store.engine.connect() as conn:
        plans.extend(
            " | ".join(row[3] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params))
            for sql, params in reads
        )


def _search(store: ResourceStore, items: list[tuple[str, str]]) -> tuple[list[str], str]:
    """The ids found, and the plans of every SELECT the search ran."""
    with _plans(store) as plans:
        page = store.search("Observation", parse_search("Observation", items))
    return sorted(e.id for e in page.entries), " | ".join(plans)


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


def test_the_consoles_newest_submissions_are_read_from_the_received_at_index(
    store: ResourceStore,
) -> None:
    """Migration 0004: /ui's list reads the newest rows from the end of the index instead of
    sorting the whole submission table."""
    with _plans(store) as plans:
        views = recent_submissions(store, Outbox(store, [Route("ehr")]), ["ehr"], limit=2)
    assert [v.id for v in views] == ["s3", "s2"]  # the newest first
    listing = next(p for p in plans if "submission" in p)
    assert "ix_submission_received_at" in listing, plans
    assert "USE TEMP B-TREE FOR ORDER BY" not in listing, plans


def _claim_steps(tmp_path: Path, settled: int) -> int:
    """SQLite VM instructions Outbox.claim runs to find one queued row behind `settled` sent
    ones (older next_attempt_at, as a ledger's history has)."""
    store = ResourceStore.from_url(f"sqlite:///{tmp_path / f'claim-{settled}.db'}")
    db.upgrade(store)
    outbox = Outbox(store, [Route("ehr")])
    with store.write() as conn:
        old = [("Observation", f"o{n}", 1) for n in range(settled)]
        outbox.enqueue_versions(conn, old, patient_ref="Patient/old", now=NOW)
        conn.execute(update(delivery).values(status="sent", sent_version=1))
        new = [("Observation", "fresh", 1)]
        outbox.enqueue_versions(conn, new, patient_ref="Patient/new", now=NOW.replace(hour=1))
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    def install(dbapi_connection: Any, *_: Any) -> None:
        dbapi_connection.set_progress_handler(count, 10)

    event.listen(store.engine, "checkout", install)
    try:
        claimed = outbox.claim("ehr", owner="w", now=NOW.replace(hour=2))
    finally:
        event.remove(store.engine, "checkout", install)
        store.close()
    assert [d.resource_id for d in claimed] == ["fresh"]
    return steps


def test_a_claim_does_not_read_the_settled_deliveries(tmp_path: Path) -> None:
    few, many = _claim_steps(tmp_path, 20), _claim_steps(tmp_path, 2_000)
    assert many < few * 1.5, (few, many)
