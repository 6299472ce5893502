"""The outbox and ledger: queued with the submission, claimed under leases, results fenced."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fhirbridge.store.resources import ResourceStore
from fhirbridge.sync.outbox import Outbox, Route
from tests.store import data as d

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
PATIENT_REF = f"Patient/{d.PATIENT}"


def _save(
    store: ResourceStore,
    outbox: Outbox,
    resources: list[dict[str, Any]],
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


def test_a_reserved_patient_is_kept_for_its_worker_and_unchanged_until_taken(
    store: ResourceStore, outbox: Outbox
) -> None:
    _save(store, outbox, [d.patient(), d.heart_rate(value=72)])
    reserved = outbox.reserve("ehr-a", owner="w1", now=T0, lease=timedelta(seconds=30))
    assert {r.key for r in reserved} == {("Patient", d.PATIENT), ("Observation", d.HEART_RATE)}
    # not in flight, not changed: only no other worker claims or reserves it
    assert {x.status for x in outbox.deliveries(target="ehr-a")} == {"queued"}
    assert outbox.claim("ehr-a", owner="w2", now=T0) == []
    assert outbox.reserve("ehr-a", owner="w2", now=T0) == []
    taken = outbox.take("ehr-a", reserved, owner="w1", now=T0 + timedelta(seconds=1))
    assert taken is not None and {t.status for t in taken} == {"in_flight"}
    assert {x.status for x in outbox.deliveries(target="ehr-a")} == {"in_flight"}
    assert outbox.record(
        "ehr-a",
        ("Patient", d.PATIENT),
        owner="w1",
        version=1,
        status="sent",
        server_id="srv-p",
        now=T0 + timedelta(seconds=2),
    )


def test_a_lapsed_reservation_is_due_again_and_cannot_be_taken(
    store: ResourceStore, outbox: Outbox
) -> None:
    _save(store, outbox, [d.patient(), d.heart_rate(value=72)])
    reserved = outbox.reserve("ehr-a", owner="w1", now=T0, lease=timedelta(seconds=30))
    later = T0 + timedelta(seconds=31)
    claimed = outbox.claim("ehr-a", owner="w2", now=later)
    assert {c.key for c in claimed} == {r.key for r in reserved}
    assert not any(c.reclaimed for c in claimed)  # never sent: nothing in doubt
    assert outbox.take("ehr-a", reserved, owner="w1", now=later) is None
    # and w2's claim is untouched by the failed take
    assert {(x.status, x.key) for x in outbox.deliveries(target="ehr-a")} == {
        ("in_flight", c.key) for c in claimed
    }


def test_an_unreserved_patient_is_as_before_and_due_at_once(
    store: ResourceStore, outbox: Outbox
) -> None:
    _save(store, outbox, [d.patient(), d.heart_rate(value=72)])
    before = {x.key: x for x in outbox.deliveries(target="ehr-a")}
    reserved = outbox.reserve("ehr-a", owner="w1", now=T0)
    outbox.unreserve("ehr-a", reserved, owner="w2")  # not w2's: nothing happens
    assert outbox.claim("ehr-a", owner="w2", now=T0) == []
    outbox.unreserve("ehr-a", reserved, owner="w1")
    assert {x.key: x for x in outbox.deliveries(target="ehr-a")} == before
    assert len(outbox.claim("ehr-a", owner="w2", now=T0)) == 2


def test_ledger_reads_and_results_touch_exactly_the_keys_given(
    store: ResourceStore, outbox: Outbox
) -> None:
    # keys are looked up as type IN (...) AND id IN (...): rows that pair the type of one key
    # with the id of another exist here and must be left alone
    with store.write() as conn:
        outbox.enqueue_versions(
            conn,
            [("Patient", "a", 1), ("Patient", "b", 1), ("Observation", "a", 1)],
            patient_ref="Patient/a",
            now=T0,
        )
        # enqueue reads the existing rows the same way: a new version of one of them only
        outbox.enqueue_versions(
            conn, [("Observation", "b", 1), ("Patient", "a", 2)], patient_ref="Patient/a", now=T0
        )
    assert {x.key: x.want_version for x in outbox.deliveries(target="ehr-a")} == {
        ("Patient", "a"): 2,
        ("Patient", "b"): 1,
        ("Observation", "a"): 1,
        ("Observation", "b"): 1,
    }
    assert set(outbox.ledger("ehr-a", [("Patient", "a"), ("Observation", "b")])) == {
        ("Patient", "a"),
        ("Observation", "b"),
    }
    claimed = outbox.claim("ehr-a", owner="w", now=T0)
    assert len(claimed) == 4
    from fhirbridge.sync.outbox import Result

    recorded = outbox.record_many(
        "ehr-a",
        [Result(("Patient", "a"), 2, "sent"), Result(("Observation", "b"), 1, "sent")],
        owner="w",
        now=T0,
    )
    assert recorded == {("Patient", "a"), ("Observation", "b")}
    assert {x.key: x.status for x in outbox.deliveries(target="ehr-a")} == {
        ("Patient", "a"): "sent",
        ("Patient", "b"): "in_flight",
        ("Observation", "a"): "in_flight",
        ("Observation", "b"): "sent",
    }
    outbox.mark_posting("ehr-a", [("Patient", "b")], owner="w", now=T0)
    outbox.release("ehr-a", [("Observation", "a")], owner="w", now=T0)
    rows = {x.key: x for x in outbox.deliveries(target="ehr-a")}
    posting = rows[("Patient", "b")]
    assert (posting.status, posting.action) == ("in_flight", "posting")
    assert rows[("Observation", "a")].status == "queued"
    assert rows[("Patient", "a")].action is None
