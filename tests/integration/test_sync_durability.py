"""Sync durability against a real FHIR server: crashed workers, and two workers on one queue.

- A ``fhirbridge worker`` process is SIGKILLed twice while 2,019 resources are being delivered:
  once exactly when a transaction has landed on the server but its answer has not reached the
  worker (the worst moment: the ledger still says in flight), once at an arbitrary moment. The
  restarted worker takes over the dead worker's rows once their lease runs out
  (FHIRBRIDGE_WORKER_LEASE_SECONDS=1 here). Every resource ends up on the server exactly once
  with our content; only the rows that were in flight at a kill were written twice (PUT to our
  id: version 2, never a second resource).
- The same with one request per resource (no transaction, no batch) and with POSTs that are
  made idempotent by If-None-Exist or by a search first, the crash simulated in-process after a
  write landed and before its result was recorded. A plain POST that cannot be verified
  (AdverseEvent: no identifier search in R4) is not POSTed again after such a crash: the row was
  taken over from an expired lease, so it is dead-lettered for ops to check, never duplicated.
- A patient whose shared records (Practitioners, Medication) are in flight with another worker
  waits for them seconds, not the five minutes of a wait for the hospital.
- Two ``fhirbridge worker`` processes on the real PostgreSQL share one queue of 2,019 resources:
  every resource is sent exactly once (versionId "1" on the server for every one of them).
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from fhirbridge.ehr.client import EhrClient
from fhirbridge.store.resources import ResourceStore
from fhirbridge.sync.capabilities import Capabilities, TypeCaps, load_profile
from fhirbridge.sync.outbox import Delivery, Outbox, Route
from fhirbridge.sync.retry import RetryPolicy
from fhirbridge.sync.targets import Target
from fhirbridge.sync.worker import TargetRuntime, Worker
from tests.integration.fault_proxy import Fault, FaultProxy
from tests.integration.fhir_server import FhirServer
from tests.integration.sync_support import (
    PER_SUBMISSION,
    SHARED,
    WorkerProcess,
    by_type,
    empty_tables,
    mapped,
    open_rows,
    queue,
    server_resources,
    statuses,
    strip_meta,
    wait_until,
    write_targets,
)

pytestmark = pytest.mark.integration

SUBMISSIONS = 84  # 84 x 24 + 3 = 2,019 distinct resources
TOTAL = SUBMISSIONS * PER_SUBMISSION + SHARED
LEASE_SECONDS = 1  # the smallest FHIRBRIDGE_WORKER_LEASE_SECONDS allows


def _worker_env(tmp_path: Path, base_url: str, database_url: str) -> dict[str, str]:
    targets = write_targets(
        tmp_path / "targets.yaml",
        [{"name": "ehr", "base_url": base_url, "profile": "generic-r4", "timeout": 30}],
    )
    return {
        "FHIRBRIDGE_TARGETS": str(targets),
        "FHIRBRIDGE_DATABASE_URL": database_url,
        "FHIRBRIDGE_WORKER_LEASE_SECONDS": str(LEASE_SECONDS),
        "FHIRBRIDGE_WORKER_IDLE_SECONDS": "0.1",
    }


def _in_flight(store: ResourceStore) -> set[tuple[str, str]]:
    outbox = Outbox(store, [Route("ehr")])
    return {d.key for d in outbox.deliveries(status="in_flight", limit=10_000)}


def _sent(store: ResourceStore, rtype: str | None = None) -> int:
    outbox = Outbox(store, [Route("ehr")])
    rows = outbox.deliveries(status="sent", limit=10_000)
    return sum(1 for d in rows if rtype is None or d.resource_type == rtype)


def _assert_on_server_exactly_once(
    server: FhirServer, ours: list[dict[str, Any]], ledger: dict[str, str] | None = None
) -> dict[tuple[str, str], str]:
    """Every one of our resources is on the server once, with our content; → versionIds.

    ``ledger``: our ``Type/id`` → the server's id, where the server chose the ids (POST); our
    references are compared as rewritten to those ids. Without it, the server's ids are ours.
    """
    expected = by_type(ours)
    theirs: dict[tuple[str, str], dict[str, Any]] = {}
    for rtype, n in expected.items():
        assert server.count(rtype) == n, rtype
        found = server_resources(server, rtype)
        assert len(found) == n, rtype
        theirs.update({(rtype, r["id"]): r for r in found})
    ids = {f"{r['resourceType']}/{r['id']}": r["id"] for r in ours} if ledger is None else ledger
    want = {
        (r["resourceType"], ids[f"{r['resourceType']}/{r['id']}"]): _with_ids(r, ids) for r in ours
    }
    assert set(theirs) == set(want)  # nothing lost, nothing extra
    mismatched = [k for k, r in theirs.items() if strip_meta(r) != strip_meta(want[k])]
    assert not mismatched, f"{len(mismatched)} resources differ, e.g. {mismatched[:3]}"
    return {k: r["meta"]["versionId"] for k, r in theirs.items()}


def _with_ids(resource: dict[str, Any], ids: dict[str, str]) -> dict[str, Any]:
    """Our resource as the server should hold it: its id and its references the server's."""

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            out = {k: walk(v) for k, v in node.items()}
            ref = node.get("reference")
            if isinstance(ref, str) and ref in ids:
                out["reference"] = f"{ref.split('/', 1)[0]}/{ids[ref]}"
            return out
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    out: dict[str, Any] = walk(resource)
    out["id"] = ids[f"{resource['resourceType']}/{resource['id']}"]
    return out


# ------------------------------------------------------------------------------- SIGKILL


def test_sigkilled_worker_loses_nothing_and_duplicates_nothing(
    tmp_path: Path, fhir_server: FhirServer
) -> None:
    # Not the fault_proxy fixture: a SIGKILLed client resets its connections, and an answer to
    # a request it sent just before dying finds no reader; the proxy records both as handler
    # errors (ConnectionResetError, BrokenPipeError). Here they are expected; nothing else is.
    fault_proxy = FaultProxy(fhir_server.base_url)
    store = ResourceStore.from_url(f"sqlite:///{tmp_path / 'fb.db'}")
    workers: list[WorkerProcess] = []

    def worker() -> WorkerProcess:
        env = _worker_env(tmp_path, fault_proxy.base_url, f"sqlite:///{tmp_path / 'fb.db'}")
        w = WorkerProcess(tmp_path / "worker.log", env).start()
        workers.append(w)
        return w

    def progress() -> str:
        return f"ledger {dict(statuses(store))}; worker log:\n{workers[-1].log_tail()}"

    try:
        store.create_schema()
        ours = queue(store, Outbox(store, [Route("ehr")]), mapped(SUBMISSIONS))
        assert len(ours) == TOTAL and statuses(store) == {"queued": TOTAL}

        # 1. Kill the worker when a transaction has landed on the server, unanswered.
        first = worker()
        wait_until(lambda: _sent(store) >= 400, timeout=40, what="400 sent", on_timeout=progress)
        fault_proxy.push(Fault("after_upstream_timeout", match_method="POST", seconds=25))
        wait_until(lambda: fault_proxy.faults_applied, timeout=10, what="the held transaction")
        # the held transaction committed upstream: the server has one patient more than we know
        wait_until(
            lambda: fhir_server.count("Patient") == _sent(store, "Patient") + 1,
            timeout=10,
            what="the held transaction to land upstream",
            on_timeout=progress,
        )
        first.kill()
        landed_unrecorded = _in_flight(store)  # the dead worker's rows, leased until it expires
        assert len(landed_unrecorded) == PER_SUBMISSION  # one patient's rows, in flight
        sent_at_kill = _sent(store)
        assert 400 <= sent_at_kill < TOTAL

        # 2. Restart; kill again at an arbitrary moment (no fault: wherever the worker is).
        second = worker()
        wait_until(
            lambda: _sent(store) >= sent_at_kill + 500,
            timeout=40,
            what="500 more sent",
            on_timeout=progress,
        )
        second.kill()
        in_flight_at_second_kill = _in_flight(store)
        assert _sent(store) < TOTAL

        # 3. Restart and let it finish: the dead workers' rows are due again after the lease.
        third = worker()
        wait_until(
            lambda: statuses(store) == {"sent": TOTAL},
            timeout=60,
            what="every row sent",
            on_timeout=progress,
        )
        third.stop()
    finally:
        for w in workers:
            w.kill()
        fault_proxy.close()
        store.close()
    client_gone = ("ConnectionResetError", "BrokenPipeError")
    unexpected = [e for e in fault_proxy.errors if not any(c in e for c in client_gone)]
    assert not unexpected, "fault proxy handler errors:\n" + "\n".join(unexpected)

    versions = _assert_on_server_exactly_once(fhir_server, ours)
    rewritten = {k for k, v in versions.items() if v != "1"}
    # The landed-but-unrecorded transaction was sent again (idempotent PUT: version 2), and
    # nothing but rows that were in flight at a kill was ever written twice.
    assert landed_unrecorded <= rewritten
    assert rewritten <= landed_unrecorded | in_flight_at_second_kill
    assert {versions[k] for k in rewritten} == {"2"}


# ------------------------------------------------------------------------------- one request each


class _Crash(BaseException):
    """The worker process dies here (not an Exception: nothing in the worker catches it)."""


class _CrashingClient:
    """An EhrClient that lets the n-th matching write reach the server, then 'dies'."""

    def __init__(self, client: EhrClient, crash_on: list[tuple[str, str]]) -> None:
        self._client = client
        self.crash_on = list(crash_on)  # (method, url type) of writes after which to die
        self.crashed: list[tuple[str, str]] = []

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        response = self._client.request(method, url, **kwargs)
        key = (method, url.split("/", 1)[0])
        if key in self.crash_on:
            self.crash_on.remove(key)
            self.crashed.append(key)
            raise _Crash(key)
        return response

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def _caps(mode: str) -> Capabilities:
    """generic-r4 without transaction and batch; "post": without PUT-as-create either, and
    with Observations created by search-then-create (no If-None-Exist for them)."""
    caps = dataclasses.replace(load_profile("generic-r4"), transaction=False, batch=False)
    if mode == "put":
        return caps
    types = {t: dataclasses.replace(c, update_create=False) for t, c in caps.types.items()}
    types["Observation"] = TypeCaps(read=True, search_identifier=True, create=True, update=True)
    unlisted = dataclasses.replace(caps.unlisted, update_create=False)
    return dataclasses.replace(caps, types=types, unlisted=unlisted)


def _crash_and_recover(
    tmp_path: Path, server: FhirServer, mode: str, crash_on: list[tuple[str, str]]
) -> tuple[list[dict[str, Any]], list[Delivery]]:
    """Deliver 4 submissions one request per resource; 'die' after each write in ``crash_on``
    landed (before its result is recorded), start a fresh worker each time. → ours, ledger."""
    server.wipe()
    store = ResourceStore.from_url(f"sqlite:///{tmp_path / 'fb.db'}")
    store.create_schema()
    outbox = Outbox(store, [Route("ehr")])
    target = Target(name="ehr", base_url=server.base_url, profile="generic-r4")
    client = EhrClient(server.base_url, timeout=(2, 10))
    crashing = _CrashingClient(client, crash_on)
    caps = _caps(mode)
    try:
        ours = queue(store, outbox, mapped(4))
        for owner in range(1, 41):  # bounded: each round is one worker "process"
            worker = Worker(
                store,
                outbox,
                [TargetRuntime(target, caps, crashing)],  # type: ignore[arg-type]
                owner=f"w{owner}",
                rng=random.Random(owner),
                policy=RetryPolicy(base_delay=0.01, max_delay=0.05),
                lease=timedelta(milliseconds=200),
            )
            try:
                for _pass in range(200):
                    if not worker.run_once():
                        break
            except _Crash:
                continue  # its rows stay in flight until the lease runs out
            open_ = statuses(store)
            if not (open_.keys() & {"queued", "in_flight", "retrying", "waiting"}):
                break
            time.sleep(0.25)  # let a dead worker's lease run out
        assert not crashing.crash_on, f"crash points never reached: {crashing.crash_on}"
        return ours, outbox.deliveries(limit=10_000)
    finally:
        client.close()
        store.close()


@pytest.mark.parametrize(
    ("mode", "crash_on"),
    [
        # after PUTs of an Encounter and of two Observations (a plain PUT to our id)
        ("put", [("PUT", "Encounter"), ("PUT", "Observation"), ("PUT", "Observation")]),
        # after a POST If-None-Exist (Procedure) and two search-then-create POSTs (Observation)
        ("post", [("POST", "Procedure"), ("POST", "Observation"), ("POST", "Observation")]),
    ],
)
def test_one_request_per_resource_survives_crashes_between_write_and_ledger(
    tmp_path: Path, shared_fhir_server: FhirServer, mode: str, crash_on: list[tuple[str, str]]
) -> None:
    ours, ledger = _crash_and_recover(tmp_path, shared_fhir_server, mode, crash_on)
    assert Counter(d.status for d in ledger) == {"sent": len(ours)}
    server_ids = {f"{d.resource_type}/{d.resource_id}": d.server_id or "" for d in ledger}
    versions = _assert_on_server_exactly_once(
        shared_fhir_server, ours, server_ids if mode == "post" else None
    )
    rewritten = Counter(k[0] for k, v in versions.items() if v != "1")
    if mode == "put":  # the PUTs whose result was lost were sent again: version 2, not a copy
        assert rewritten == {"Encounter": 1, "Observation": 2}
    else:  # If-None-Exist / the search found what the lost POST created: nothing written twice
        assert not rewritten


def test_an_unverifiable_post_that_landed_before_a_crash_is_not_posted_again(
    tmp_path: Path, shared_fhir_server: FhirServer
) -> None:
    # AdverseEvent has no identifier search in R4: without PUT it can only be a plain POST
    ours, ledger = _crash_and_recover(
        tmp_path, shared_fhir_server, "post", [("POST", "AdverseEvent")]
    )
    assert shared_fhir_server.count("AdverseEvent") == by_type(ours)["AdverseEvent"]
    dead = [d for d in ledger if d.status == "dead"]
    assert [d.resource_type for d in dead] == ["AdverseEvent"]
    assert "outcome unknown" in (dead[0].last_error or "")
    # The import's Provenance targets that record: it waits, visibly, until ops resolve it.
    waiting = [d for d in ledger if d.status == "waiting"]
    assert [d.resource_type for d in waiting] == ["Provenance"]
    assert waiting[0].last_error
    assert Counter(d.status for d in ledger) == {"sent": len(ours) - 2, "dead": 1, "waiting": 1}


def test_a_patient_waiting_for_shared_records_in_flight_elsewhere_is_rechecked_soon(
    tmp_path: Path, shared_fhir_server: FhirServer
) -> None:
    """Two patients share Practitioners and a Medication. While another worker holds the first
    patient (and with it the shared records), the second waits for them: seconds, not the
    five minutes of a wait for the hospital (no matching patient or encounter)."""
    server = shared_fhir_server
    server.wipe()
    store = ResourceStore.from_url(f"sqlite:///{tmp_path / 'fb.db'}")
    store.create_schema()
    outbox = Outbox(store, [Route("ehr")])
    client = EhrClient(server.base_url, timeout=(2, 10))
    offset = timedelta()
    worker = Worker(
        store,
        outbox,
        [
            TargetRuntime(
                Target(name="ehr", base_url=server.base_url, profile="generic-r4"),
                load_profile("generic-r4"),
                client,
            )
        ],
        owner="w",
        clock=lambda: datetime.now(UTC) + offset,
    )
    try:
        ours = queue(store, outbox, mapped(2))
        held = outbox.claim("ehr", owner="elsewhere", now=datetime.now(UTC))  # patient 0
        assert {d.resource_type for d in held} >= {"Practitioner", "Medication"}
        before = datetime.now(UTC)
        assert worker.run_once() == PER_SUBMISSION  # patient 1
        waiting = outbox.deliveries(status="waiting", limit=100)
        assert waiting, "patient 1 should wait for the shared records"
        assert any("Practitioner/" in (d.last_error or "") for d in waiting)
        assert max(d.next_attempt_at for d in waiting) <= before + timedelta(seconds=5)
        # the other worker finishes nothing and gives its rows back; two seconds later all goes
        outbox.release("ehr", [d.key for d in held], owner="elsewhere", now=datetime.now(UTC))
        worker.run_once()  # patient 0, with the shared records
        offset = timedelta(seconds=3)
        worker.run_once()  # patient 1, rechecked
        assert statuses(store) == {"sent": len(ours)}
    finally:
        client.close()
        store.close()
    versions = _assert_on_server_exactly_once(server, ours)
    assert set(versions.values()) == {"1"}


# ------------------------------------------------------------------------------- PostgreSQL


@pytest.mark.postgres
def test_two_workers_on_postgresql_send_every_resource_exactly_once(
    tmp_path: Path, fhir_server: FhirServer, postgres_url: str
) -> None:
    store = ResourceStore.from_url(postgres_url)
    # one proxy per worker, both in front of the same server: who sent what
    proxies = [FaultProxy(fhir_server.base_url) for _ in range(2)]
    workers: list[WorkerProcess] = []
    try:
        store.create_schema()
        empty_tables(store)
        ours = queue(store, Outbox(store, [Route("ehr")]), mapped(SUBMISSIONS))
        assert statuses(store) == {"queued": TOTAL}
        for i, proxy in enumerate(proxies):
            folder = tmp_path / f"worker{i}"
            folder.mkdir()
            env = _worker_env(folder, proxy.base_url, postgres_url)
            workers.append(WorkerProcess(folder / "worker.log", env).start())

        def progress() -> str:
            return f"ledger {dict(statuses(store))}; open {dict(open_rows(store))} " + " | ".join(
                w.log_tail(1500) for w in workers
            )

        wait_until(
            lambda: statuses(store) == {"sent": TOTAL},
            timeout=60,
            what="every row sent",
            on_timeout=progress,
        )
        for w in workers:
            assert w.alive(), w.log_tail()
            assert w.stop() == 0, w.log_tail()
        transactions = [sum(1 for m, _ in p.requests_seen if m == "POST") for p in proxies]
    finally:
        for w in workers:
            w.kill()
        for proxy in proxies:
            proxy.close()
        try:
            empty_tables(store)
        finally:
            store.close()
    # both workers took a real share of the queue (one transaction per patient pass)
    assert min(transactions) >= SUBMISSIONS // 5, transactions
    assert sum(transactions) >= SUBMISSIONS
    versions = _assert_on_server_exactly_once(fhir_server, ours)
    twice = sorted(k for k, v in versions.items() if v != "1")
    assert not twice, f"{len(twice)} resources were written more than once, e.g. {twice[:3]}"
    assert not any(p.errors for p in proxies)


def test_one_worker_with_concurrency_sends_every_resource_exactly_once(
    tmp_path: Path, fhir_server: FhirServer
) -> None:
    # `fhirbridge worker --concurrency 3` on SQLite: three delivery slots in one process
    # share the queue like three worker processes would, with no double claim.
    store = ResourceStore.from_url(f"sqlite:///{tmp_path / 'concurrent.db'}")
    proxy = FaultProxy(fhir_server.base_url)
    worker: WorkerProcess | None = None
    submissions = 30
    try:
        store.create_schema()
        ours = queue(store, Outbox(store, [Route("ehr")]), mapped(submissions))
        total = sum(statuses(store).values())
        env = _worker_env(tmp_path, proxy.base_url, f"sqlite:///{tmp_path / 'concurrent.db'}")
        worker = WorkerProcess(tmp_path / "worker.log", env)
        worker.command.extend(["--concurrency", "3"])
        worker.start()
        wait_until(
            lambda: statuses(store) == {"sent": total},
            timeout=60,
            what="every row sent",
            on_timeout=lambda: f"ledger {dict(statuses(store))} | {worker.log_tail(1500)}",
        )
        assert worker.stop() == 0, worker.log_tail()
        log_text = (tmp_path / "worker.log").read_text()
        assert "3 in flight at most" in log_text
        transactions = sum(1 for m, _ in proxy.requests_seen if m == "POST")
    finally:
        if worker is not None:
            worker.kill()
        proxy.close()
        store.close()
    assert transactions >= submissions
    versions = _assert_on_server_exactly_once(fhir_server, ours)
    assert set(versions.values()) == {"1"}, "a resource was written more than once"
    assert not proxy.errors
