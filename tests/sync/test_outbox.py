"""The outbox and ledger: queued with the submission, claimed under leases, results fenced."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from fhirbridge.store.resources import ResourceStore
from fhirbridge.sync.outbox import Outbox, Route
from tests.store import data as d

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
PATIENT_REF = f"Patient/{d.PATIENT}"


def _save(
    store: ResourceStore,
    outbox: Outbox,
    resources: list[dict],
    now: datetime = T0,
    fail: bool = False,
) -> None:
    import uuid

    def on_saved(conn, saved):
        outbox.enqueue(conn, saved, patient_ref=PATIENT_REF, now=now)
        if fail:
            raise RuntimeError("crash after queueing, before commit")

    store.save_submission(
        submission_id=str(uuid.uuid4()),
        source="clinic-a",
        patient_id="p",
        content_hash=uuid.uuid4().hex,
        resources=resources,
        summary={},
        now=now,
        on_saved=on_saved,
    )


@pytest.fixture
def outbox(store: ResourceStore) -> Outbox:
    return Outbox(store, [Route("ehr-a"), Route("ehr-b", frozenset({"Observation"}))])


def test_accepting_and_queueing_commit_together(store: ResourceStore, outbox: Outbox) -> None:
    with pytest.raises(RuntimeError):
        _save(store, outbox, [d.patient(), d.heart_rate(value=72)], fail=True)
    assert outbox.deliveries() == []
    from fhirbridge.errors import NotFoundError  # the store has nothing either

    with pytest.raises(NotFoundError):
        store.read("Patient", d.PATIENT)
    _save(store, outbox, [d.patient(), d.heart_rate(value=72)])
    rows = {(x.target, x.resource_type) for x in outbox.deliveries()}
    assert rows == {("ehr-a", "Patient"), ("ehr-a", "Observation"), ("ehr-b", "Observation")}
    assert {x.status for x in outbox.deliveries()} == {"queued"}


def test_claim_lease_record_and_requeue_on_new_version(
    store: ResourceStore, outbox: Outbox
) -> None:
    _save(store, outbox, [d.patient(), d.heart_rate(value=72)])
    claimed = outbox.claim("ehr-a", owner="w1", now=T0)
    assert {c.key for c in claimed} == {("Patient", d.PATIENT), ("Observation", d.HEART_RATE)}
    assert {c.status for c in claimed} == {"in_flight"}
    assert outbox.claim("ehr-a", owner="w2", now=T0) == []  # leased
    # a new version arrives while the old one is in flight
    _save(store, outbox, [d.heart_rate(value=80)], now=T0 + timedelta(seconds=1))
    key = ("Observation", d.HEART_RATE)
    assert outbox.record(
        "ehr-a",
        key,
        owner="w1",
        version=1,
        status="sent",
        server_id="srv-1",
        server_version="1",
        action="put",
        now=T0 + timedelta(seconds=2),
    )
    row = outbox.ledger("ehr-a", [key])[key]
    assert (row.status, row.sent_version, row.want_version, row.server_id) == (
        "queued",
        1,
        2,
        "srv-1",
    )
    assert outbox.server_refs("ehr-a", [f"Observation/{d.HEART_RATE}"]) == {
        f"Observation/{d.HEART_RATE}": "Observation/srv-1"
    }
    # the patient row: w2 may not record what w1 holds
    assert not outbox.record(
        "ehr-a", ("Patient", d.PATIENT), owner="w2", version=1, status="sent", now=T0
    )


def test_an_expired_lease_makes_the_row_due_again(store: ResourceStore, outbox: Outbox) -> None:
    _save(store, outbox, [d.patient()])
    assert len(outbox.claim("ehr-a", owner="dead-worker", now=T0, lease=timedelta(seconds=30))) == 1
    assert outbox.claim("ehr-a", owner="w2", now=T0 + timedelta(seconds=29)) == []
    again = outbox.claim("ehr-a", owner="w2", now=T0 + timedelta(seconds=31))
    assert [c.key for c in again] == [("Patient", d.PATIENT)]
    # the dead worker's late result is refused
    assert not outbox.record(
        "ehr-a",
        again[0].key,
        owner="dead-worker",
        version=1,
        status="sent",
        now=T0 + timedelta(seconds=32),
    )


def test_retry_dead_letter_replay_and_summary(store: ResourceStore, outbox: Outbox) -> None:
    _save(store, outbox, [d.patient(), d.heart_rate(value=72)])
    p_key, o_key = ("Patient", d.PATIENT), ("Observation", d.HEART_RATE)
    outbox.claim("ehr-a", owner="w", now=T0)
    later = T0 + timedelta(seconds=60)
    outbox.record(
        "ehr-a",
        p_key,
        owner="w",
        version=1,
        status="retrying",
        error="503 transient",
        next_attempt_at=later,
        now=T0,
    )
    outbox.record(
        "ehr-a",
        o_key,
        owner="w",
        version=1,
        status="dead",
        error="422 processing: Observation.code",
        now=T0,
    )
    assert outbox.claim("ehr-a", owner="w", now=T0 + timedelta(seconds=59)) == []
    summary = outbox.summary(T0 + timedelta(seconds=10))
    assert summary["ehr-a"]["retrying"] == 1 and summary["ehr-a"]["dead"] == 1
    assert summary["ehr-a"]["oldestWaitingSeconds"] == 10
    assert summary["ehr-b"]["queued"] == 1
    dead = outbox.deliveries(target="ehr-a", status="dead")
    assert [x.last_error for x in dead] == ["422 processing: Observation.code"]
    assert dead[0].attempts == 1
    assert outbox.replay("ehr-a", None, now=later) == 1
    row = outbox.ledger("ehr-a", [o_key])[o_key]
    assert (row.status, row.attempts) == ("queued", 0)


@pytest.mark.postgres
def test_concurrent_claimers_never_share_a_row(postgres_url: str) -> None:
    from fhirbridge.store.schema import metadata

    store = ResourceStore.from_url(postgres_url)
    store.create_schema()
    with store.engine.begin() as conn:
        for table in reversed(metadata.sorted_tables):
            conn.execute(table.delete())
    outbox = Outbox(store, [Route("ehr")])
    with store.write() as conn:
        for p in range(40):
            outbox.enqueue_versions(
                conn,
                [("Observation", f"o-{p}-{i}", 1) for i in range(5)],
                patient_ref=f"Patient/p-{p}",
                now=T0,
            )
    seen: list[tuple[str, str]] = []
    lock = threading.Lock()

    def work(name: str) -> None:
        while True:
            got = outbox.claim("ehr", owner=name, now=T0, limit=5)
            if not got:
                return
            with lock:
                seen.extend(g.key for g in got)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    store.close()
    assert len(seen) == 200 and len(set(seen)) == 200
