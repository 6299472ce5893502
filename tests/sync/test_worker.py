"""The worker's bookkeeping overlaps its request, and nothing about durability changes.

Against an in-process fake target (no server): while a patient's request is on the wire the
helper thread writes earlier results and reserves, reads and plans the next patient. Checked
here: one patient in flight at a time (the reserved one is not), every result and AuditEvent
written when `run_once` returns, a write the helper could not make made before it returns,
the reservation given back by `close`, an in-memory store served without a helper thread.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from fhirbridge.ehr.client import EhrResponse
from fhirbridge.store.resources import ResourceStore
from fhirbridge.store.schema import delivery, resources
from fhirbridge.sync import worker as worker_module
from fhirbridge.sync.capabilities import load_profile
from fhirbridge.sync.outbox import Outbox, Route
from fhirbridge.sync.targets import Target
from fhirbridge.sync.worker import TargetRuntime, Worker
from tests.integration.sync_support import PER_SUBMISSION, SHARED, mapped, queue

_d = delivery.c


class FakeEhr:
    """Answers every write with 201 at once; `on_request(keys)` runs while it is "on the wire"
    (keys: our `Type/id`s the request carries), after the `on_sent` hook, as EhrClient's."""

    def __init__(self, on_request: Callable[[set[str]], None] | None = None) -> None:
        self.requests: list[set[str]] = []
        self.on_request = on_request
        self._hook: Callable[[], None] | None = None

    def on_sent(self, fn: Callable[[], None] | None) -> None:
        self._hook = fn

    def _sent(self, keys: set[str]) -> None:
        self.requests.append(keys)
        hook, self._hook = self._hook, None
        if hook is not None:
            hook()
        if self.on_request is not None:
            self.on_request(keys)

    def transaction(self, bundle: dict[str, Any]) -> EhrResponse:
        self._sent({e["request"]["url"] for e in bundle["entry"]})
        entries = [
            {"response": {"status": "201 Created", "location": f"{e['request']['url']}/_history/1"}}
            for e in bundle["entry"]
        ]
        body = {"resourceType": "Bundle", "type": "transaction-response", "entry": entries}
        return EhrResponse(200, {}, body)

    def request(self, method: str, url: str, **_: Any) -> EhrResponse:
        self._sent({url})
        return EhrResponse(201, {"Location": f"{url}/_history/1", "ETag": 'W/"1"'}, None)


def _worker(store: ResourceStore, client: FakeEhr, *, single: bool = False) -> Worker:
    caps = load_profile("generic-r4")
    if single:  # one request per resource
        caps = dataclasses.replace(caps, transaction=False, batch=False)
    target = Target(name="ehr", base_url="http://ehr.test/fhir", profile="generic-r4")
    return Worker(
        store,
        Outbox(store, [Route("ehr")]),
        [TargetRuntime(target, caps, client)],  # type: ignore[arg-type]
        owner="w",
    )


def _rows(store: ResourceStore) -> dict[str, tuple[str, str | None]]:
    """`Type/id` → (status, lease owner) of every ledger row."""
    with store.engine.connect() as conn:
        return {
            f"{r.resource_type}/{r.resource_id}": (r.status, r.lease_owner)
            for r in conn.execute(select(delivery))
        }


def _audit_events(store: ResourceStore) -> int:
    with store.engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count())
                .select_from(resources)
                .where(resources.c.resource_type == "AuditEvent")
            ).scalar_one()
        )


def _wait_for(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture(autouse=True)
def _overlap_always(monkeypatch: pytest.MonkeyPatch) -> None:
    # The fake answers at once: overlap whatever the wait (one test sets it back)
    monkeypatch.setattr(worker_module, "OVERLAP_MIN_WAIT", 0.0)


@pytest.fixture
def file_store(tmp_path: Path) -> Iterator[ResourceStore]:
    store = ResourceStore.from_url(f"sqlite:///{tmp_path / 'fb.db'}")
    store.create_schema()
    yield store
    store.close()


def test_one_patient_in_flight_the_next_reserved_and_all_written_on_return(
    file_store: ResourceStore,
) -> None:
    store = file_store
    ours = queue(store, Outbox(store, [Route("ehr")]), mapped(3))
    seen: list[dict[str, tuple[str, str | None]]] = []

    def on_request(keys: set[str]) -> None:
        rows = _rows(store)
        # in flight: exactly what this request carries (the first patient's shared records too)
        assert {k for k, (status, _) in rows.items() if status == "in_flight"} == keys
        if len(seen) < 2:  # the next patient gets reserved meanwhile, and stays queued
            _wait_for(
                lambda: any(
                    owner == "w" and status == "queued" for status, owner in _rows(store).values()
                ),
                "the next patient's reservation",
            )
        seen.append(_rows(store))

    client = FakeEhr(on_request)
    worker = _worker(store, client)
    try:
        for n in range(3):
            assert worker.run_once() == (PER_SUBMISSION + SHARED if n == 0 else PER_SUBMISSION)
            rows = _rows(store)
            assert Counter(status for status, _ in rows.values()) == +Counter(
                sent=(n + 1) * PER_SUBMISSION + SHARED, queued=(2 - n) * PER_SUBMISSION
            )
            reserved = {k for k, (status, owner) in rows.items() if owner is not None}
            assert len(reserved) == (PER_SUBMISSION if n < 2 else 0)
            assert {rows[k][0] for k in reserved} <= {"queued"}
            assert _audit_events(store) == n + 1  # one per request, written by return
        assert worker.run_once() == 0
    finally:
        worker.close()
    # the patients after the first reference its shared records: planned once they were sent
    assert [len(keys) for keys in client.requests] == [PER_SUBMISSION + SHARED] + 2 * [
        PER_SUBMISSION
    ]
    assert Counter(status for status, _ in _rows(store).values()) == {"sent": len(ours)}


def test_close_gives_the_reserved_patient_back(file_store: ResourceStore) -> None:
    store = file_store
    outbox = Outbox(store, [Route("ehr")])
    queue(store, outbox, mapped(2))
    worker = _worker(store, FakeEhr())
    assert worker.run_once() == PER_SUBMISSION + SHARED
    now = datetime.now(UTC)
    assert outbox.claim("ehr", owner="other", now=now) == []  # reserved for "w"
    worker.close()
    worker.close()  # idempotent
    taken = outbox.claim("ehr", owner="other", now=now)
    assert len(taken) == PER_SUBMISSION
    assert {d.status for d in taken} == {"in_flight"}
    assert not any(d.reclaimed for d in taken)


def test_a_write_the_helper_could_not_make_is_made_before_run_once_returns(
    file_store: ResourceStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = file_store
    queue(store, Outbox(store, [Route("ehr")]), mapped(1))
    client = FakeEhr()
    worker = _worker(store, client, single=True)
    record_many = Outbox.record_many
    failed: list[str] = []

    def flaky(self: Outbox, *args: Any, **kwargs: Any) -> set[tuple[str, str]]:
        if threading.current_thread() is not threading.main_thread() and not failed:
            failed.append(threading.current_thread().name)
            raise RuntimeError("database is locked")
        return record_many(self, *args, **kwargs)

    monkeypatch.setattr(Outbox, "record_many", flaky)
    try:
        assert worker.run_once() == PER_SUBMISSION + SHARED
    finally:
        worker.close()
    assert failed and failed[0].startswith("sync-helper")
    assert Counter(status for status, _ in _rows(store).values()) == {
        "sent": PER_SUBMISSION + SHARED
    }
    # each request audited exactly once (the helper's events were written before it failed)
    assert len(client.requests) == PER_SUBMISSION + SHARED
    assert _audit_events(store) == len(client.requests)


def test_an_in_memory_store_is_served_without_a_helper_thread() -> None:
    store = ResourceStore.from_url("sqlite://")
    store.create_schema()
    try:
        ours = queue(store, Outbox(store, [Route("ehr")]), mapped(2))
        worker = _worker(store, FakeEhr())
        assert worker.run_once() == PER_SUBMISSION + SHARED
        assert not any(owner for _, owner in _rows(store).values())  # nothing reserved
        assert worker.run_once() == PER_SUBMISSION
        worker.close()
        assert Counter(status for status, _ in _rows(store).values()) == {"sent": len(ours)}
        assert not any(t.name.startswith("sync-helper") for t in threading.enumerate())
    finally:
        store.close()


def test_read_stored_many_reads_exactly_the_keys_asked_for(file_store: ResourceStore) -> None:
    # (type, id) pairs are looked up as type IN (...) AND id IN (...): a type of one key with
    # the id of another must not come back
    store = file_store
    queue(store, Outbox(store, [Route("ehr")]), mapped(1))
    with store.engine.connect() as conn:
        stored = [(r.resource_type, r.id) for r in conn.execute(select(resources))]
    patient = next(k for k in stored if k[0] == "Patient")
    observation = next(k for k in stored if k[0] == "Observation")
    asked = [patient, observation, ("Patient", observation[1]), ("Observation", "nope")]
    assert set(store.read_stored_many(asked)) == {patient, observation}
    assert store.read_stored_many([]) == {}


def test_a_reservation_older_than_half_the_lease_is_given_back_and_claimed_afresh(
    file_store: ResourceStore,
) -> None:
    store = file_store
    outbox = Outbox(store, [Route("ehr")])
    queue(store, outbox, mapped(2))
    offset = timedelta()
    client = FakeEhr()
    target = Target(name="ehr", base_url="http://ehr.test/fhir", profile="generic-r4")
    worker = Worker(
        store,
        outbox,
        [TargetRuntime(target, load_profile("generic-r4"), client)],  # type: ignore[arg-type]
        owner="w",
        clock=lambda: datetime.now(UTC) + offset,
        lease=timedelta(seconds=60),
    )
    try:
        assert worker.run_once() == PER_SUBMISSION + SHARED
        offset = timedelta(seconds=40)  # the reservation (60 s) is two thirds gone
        assert worker.run_once() == PER_SUBMISSION
    finally:
        worker.close()
    assert Counter(status for status, _ in _rows(store).values()) == {
        "sent": 2 * PER_SUBMISSION + SHARED
    }


def test_no_overlap_while_the_target_answers_faster_than_the_work_it_would_hide(
    file_store: ResourceStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = file_store
    queue(store, Outbox(store, [Route("ehr")]), mapped(3))
    monkeypatch.setattr(worker_module, "OVERLAP_MIN_WAIT", 0.010)
    worker = _worker(store, FakeEhr())  # answers in microseconds
    try:
        # the first request: its wait unknown yet, the next patient is reserved meanwhile
        assert worker.run_once() == PER_SUBMISSION + SHARED
        assert sum(owner == "w" for _, owner in _rows(store).values()) == PER_SUBMISSION
        assert worker.run_once() == PER_SUBMISSION
        # from then on the worker knows the answers come fast: nothing reserved ahead
        assert not any(owner for _, owner in _rows(store).values())
        assert worker.run_once() == PER_SUBMISSION
    finally:
        worker.close()
    assert Counter(status for status, _ in _rows(store).values()) == {
        "sent": 3 * PER_SUBMISSION + SHARED
    }
