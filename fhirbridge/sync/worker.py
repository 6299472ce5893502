"""The sync worker: claim due deliveries, plan them, send them, record what the target did.

The only module that uses the store, the outbox, the planner and the EHR client together.
One round per claimed patient: the planner sees that patient's due resources with what the
target already holds; steps run in order, every result is recorded in the ledger as soon as it
is known, and steps that wait for the ids of earlier POSTs are planned again with those ids.
Decisions on failure come from sync/retry.py as values; nothing here sleeps on a failure.

One request in flight per Worker, and the worker's own bookkeeping overlaps it. With a single
request in flight, whatever the worker does between requests adds to the target's time. So
what does not need the answer of the request on the wire is handed to the worker's helper
thread as soon as the request is sent (`EhrClient.on_sent`): writing the AuditEvents and
ledger results of earlier steps, and reserving, reading and planning the target's next patient
(the next `run_once` starts with that patient's request). Only while the target's answers take
long enough to hide that work (OVERLAP_MIN_WAIT); faster ones get it inline, as a shorter wait
would leave the helper competing with the handling of the answer. Requests stay on the calling
thread, one at a time. What is recorded when does not change: every result is written before
`run_once` returns, an AuditEvent before the ledger write that records its step (the helper's
writes run in order, the last one after them), a row is claimed (in flight, leased) before it
is sent and marked `posting` before an unverifiable POST of it; a reserved patient is not in
flight, only kept from other workers, until `run_once` claims it.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import random
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.pool import StaticPool

from fhirbridge import audit
from fhirbridge.ehr.client import EhrClient, EhrResponse, entry_results
from fhirbridge.ehr.errors import EhrError, OutcomeUnknownError
from fhirbridge.errors import GoneError, NotFoundError
from fhirbridge.store.fhirdates import parse_range
from fhirbridge.store.resources import ResourceStore
from fhirbridge.sync import planner
from fhirbridge.sync.capabilities import Capabilities
from fhirbridge.sync.outbox import Delivery, Outbox, Result
from fhirbridge.sync.retry import (
    DEFAULT_POLICY,
    DeadLetter,
    ResolveUnknown,
    RetryAt,
    RetryPolicy,
    decide,
)
from fhirbridge.sync.targets import Target

log = logging.getLogger(__name__)

WAIT_RECHECK = timedelta(minutes=5)  # a delivery waiting for the target (no encounter, no patient)
# a delivery waiting for one of our own resources that another pass is delivering right now
DEPENDENCY_RECHECK = timedelta(seconds=2)
# Buffered results are handed to the helper thread, to be written while the next request is on
# the wire, once there are this many (and all of them with the last request of a plan): a few
# transactions per patient, not one per request, and little left to write after the last answer.
FLUSH_BATCH = 12
# The helper is given work only while the target's answers take this long (a running average
# of its requests): a shorter wait cannot hide the work, which then competes with the worker's
# own handling of the answer (the interpreter lock) and, on a shared machine, with the target.
OVERLAP_MIN_WAIT = 0.010  # seconds


@dataclass
class TargetRuntime:
    """One configured target, ready to send to."""

    target: Target
    caps: Capabilities
    client: EhrClient


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


@dataclass(slots=True)
class _Ahead:
    """A target's next patient, reserved (and read, and planned) while a request of the one
    before was on the wire (`Outbox.reserve`: not in flight until `run_once` takes it)."""

    rows: list[Delivery]
    reserved_at: datetime
    # Our `Type/id`s whose ledger rows this worker was about to write (the patient being
    # delivered): a plan that references one of them was made without its result.
    watch: frozenset[str]
    stored: dict[tuple[str, str], planner.Due] | None = None
    refs: dict[str, str] | None = None
    plan: planner.Plan | None = None


@dataclass(frozen=True, slots=True)
class _Outcome:
    status: str  # sent | fallback | skipped | retrying | dead | waiting
    server_id: str | None = None
    server_version: str | None = None
    action: str | None = None
    error: str | None = None
    next_at: datetime | None = None
    count_attempt: bool = True


@dataclass(frozen=True, slots=True)
class _HandOver:
    """What `_hand_over` gives the helper thread before a step's request goes out."""

    flush_all: bool  # every buffered result (the plan's last request), not only a full batch
    watch: frozenset[str] | None  # reserve the next patient (the first request of a pass)


@dataclass(frozen=True, slots=True)
class _Unwritten:
    """What a write on the helper thread could not write, and why."""

    events: list[dict[str, Any]]
    results: list[Result]
    error: Exception


class Worker:
    """Delivers due outbox rows to their targets; `run_once` is one pass over all targets."""

    def __init__(
        self,
        store: ResourceStore,
        outbox: Outbox,
        runtimes: Sequence[TargetRuntime],
        *,
        owner: str | None = None,
        policy: RetryPolicy = DEFAULT_POLICY,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        rng: random.Random | None = None,
        limit: int = 500,
        lease: timedelta = timedelta(minutes=2),
    ) -> None:
        self.store, self.outbox, self.runtimes = store, outbox, list(runtimes)
        self.owner = owner or default_owner()
        self.policy, self.clock = policy, clock
        self.rng = rng or random.Random()
        self.limit, self.lease = limit, lease
        # Outcomes not yet written to the ledger: written in one transaction per planning
        # round (see _flush), not one per resource.
        self._results: list[Result] = []
        self._audits: list[dict[str, Any]] = []  # one AuditEvent per request, written likewise
        self._ahead: dict[str, _Ahead] = {}  # target name → its next patient, reserved ahead
        # The helper thread, and what was handed to it and not yet joined. An in-memory SQLite
        # store has a single connection, which two threads cannot share: no helper then.
        self._overlap = not isinstance(store.engine.pool, StaticPool)
        self._helper: ThreadPoolExecutor | None = None
        self._jobs: list[Future[_Unwritten | None]] = []
        self._waits: dict[str, float] = {}  # target name → how long its requests take (average)
        atexit.register(_give_back_at_exit, weakref.ref(self))

    # ------------------------------------------------------------------ loop

    def run_once(self) -> int:
        """Claim and deliver one patient's due rows per target; the number of rows handled.

        Every result is in the ledger when it returns. The target's next patient may be
        reserved already (see `_reserve_ahead`): the next call delivers it; `close` gives it
        back.
        """
        handled = 0
        for rt in self.runtimes:
            ahead = self._take_ahead(rt)
            rows = (
                ahead.rows
                if ahead is not None
                else self.outbox.claim(
                    rt.target.name,
                    owner=self.owner,
                    now=self.clock(),
                    limit=self.limit,
                    lease=self.lease,
                )
            )
            if rows:
                handled += len(rows)
                self._deliver(rt, rows, ahead)
        return handled

    def run(self, stop: threading.Event, idle_seconds: float = 1.0) -> None:
        """Deliver until `stop` is set, resting `idle_seconds` when nothing is due."""
        try:
            while not stop.is_set():
                try:
                    busy = self.run_once()
                except Exception as exc:  # a broken database or target must not kill the loop
                    log.error("sync pass failed: %s", type(exc).__name__)
                    busy = 0
                if not busy:
                    stop.wait(idle_seconds)
        finally:
            try:
                self.close()
            except Exception as exc:
                log.error("sync worker close failed: %s", type(exc).__name__)

    def close(self) -> None:
        """Give back the patients reserved ahead and stop the helper thread (idempotent)."""
        self._join()
        self._give_back()
        if self._helper is not None:
            self._helper.shutdown(wait=True)
            self._helper = None

    def _give_back(self) -> None:
        while self._ahead:
            name, ahead = self._ahead.popitem()
            self.outbox.unreserve(name, ahead.rows, owner=self.owner)

    def _take_ahead(self, rt: TargetRuntime) -> _Ahead | None:
        """The patient reserved ahead for this target, now claimed; None when there is none,
        or its reservation is half run out or did not hold (the caller claims afresh)."""
        ahead = self._ahead.pop(rt.target.name, None)
        if ahead is None:
            return None
        now = self.clock()
        if now < ahead.reserved_at + self.lease / 2:
            rows = self.outbox.take(
                rt.target.name, ahead.rows, owner=self.owner, now=now, lease=self.lease
            )
            if rows is not None:
                ahead.rows = rows
                return ahead
        self.outbox.unreserve(rt.target.name, ahead.rows, owner=self.owner)
        return None

    # ------------------------------------------------------------------ one patient

    def _deliver(self, rt: TargetRuntime, rows: list[Delivery], ahead: _Ahead | None) -> None:
        try:
            self._deliver_rounds(rt, rows, ahead)
        finally:
            self._flush(rt)

    def _flush(self, rt: TargetRuntime) -> None:
        """Write the buffered outcomes to the ledger, in one transaction, after whatever the
        helper thread still has to write.

        Buffering is safe because every write the planner makes is idempotent (PUT to our id,
        conditional create, search-then-create) except the plain POST of an unverifiable
        resource, whose row is marked `posting` in the ledger before it is sent: a worker that
        dies with outcomes still buffered leaves rows whose lease runs out and that the next
        worker re-sends (idempotently) or dead-letters (the POSTs in doubt).
        """
        self._join()
        events, self._audits = self._audits, []
        results, self._results = self._results, []
        self._write(rt.target.name, events, results)

    def _write(self, target: str, events: list[dict[str, Any]], results: list[Result]) -> None:
        # Audit first: a request that reached the target stays audited if the ledger write fails
        # (its rows are then sent again, idempotently, and audited again).
        audit.record(self.store, events)
        self.outbox.record_many(target, results, owner=self.owner, now=self.clock())

    def _write_ahead(
        self, target: str, events: list[dict[str, Any]], results: list[Result]
    ) -> _Unwritten | None:
        """`_write` on the helper thread: what it could not write goes back to the caller's
        buffer at the next join (and is written, or raises, with the next flush)."""
        try:
            audit.record(self.store, events)
        except Exception as exc:
            return _Unwritten(events, results, exc)
        try:
            self.outbox.record_many(target, results, owner=self.owner, now=self.clock())
        except Exception as exc:
            return _Unwritten([], results, exc)
        return None

    def _hand_over(
        self, rt: TargetRuntime, *, flush_all: bool, watch: frozenset[str] | None
    ) -> None:
        """While a request is out: give the helper thread the results buffered so far (once
        there are FLUSH_BATCH, or all of them with the last request of a plan) and, with the
        first request of a pass, the reservation of the target's next patient (`watch`)."""
        if self._results and (flush_all or len(self._results) >= FLUSH_BATCH):
            self._submit(self._write_ahead, rt.target.name, self._audits, self._results)
            self._audits, self._results = [], []  # handed over (kept if the submit failed)
        if watch is not None:
            self._submit(self._reserve_ahead, rt, watch)

    def _submit(self, fn: Callable[..., _Unwritten | None], *args: Any) -> None:
        if self._helper is None:
            self._helper = ThreadPoolExecutor(1, thread_name_prefix="sync-helper")
        self._jobs.append(self._helper.submit(fn, *args))

    def _join(self) -> None:
        """Wait for what the helper thread was given; what it could not write is buffered
        again, in front of what came after it."""
        jobs, self._jobs = self._jobs, []
        back_events: list[dict[str, Any]] = []
        back_results: list[Result] = []
        for job in jobs:
            try:
                unwritten = job.result()
            except Exception as exc:  # the reservation: what it reserved is kept, or runs out
                log.warning("sync: reserving ahead failed: %s", type(exc).__name__)
                continue
            if unwritten is not None:
                log.warning(
                    "sync: writing results ahead failed: %s", type(unwritten.error).__name__
                )
                back_events += unwritten.events
                back_results += unwritten.results
        self._audits[:0] = back_events
        self._results[:0] = back_results

    def _deliver_rounds(
        self, rt: TargetRuntime, rows: list[Delivery], ahead: _Ahead | None
    ) -> None:
        pending: dict[str, Delivery] = {f"{r.resource_type}/{r.resource_id}": r for r in rows}
        versions: dict[str, int] = {}
        encounters: dict[str, str | None] = {}  # our Encounter → the target's (lookup cache)
        # The next patient is reserved during this one's first request (once per run_once).
        reserve_watch: frozenset[str] | None = frozenset(pending)
        for round_ in range(20):  # each round settles at least one step, or stops
            if not pending:
                break
            first = ahead if round_ == 0 else None
            due = self._due(rt, pending, versions, first.stored if first is not None else None)
            if not due:
                break
            self._flush(rt)  # planning reads the ledger (server ids of what was just sent)
            planned = _planned_ahead(first, due)
            if planned is not None:
                refs, plan = planned
            else:
                refs = self.outbox.server_refs(rt.target.name, _references(due))
                patient_ref = refs.get(rows[0].patient_ref)
                try:
                    encounter_refs = self._encounter_refs(rt, due, patient_ref, encounters)
                except EhrError as err:  # the lookup failed: a retry later, as for a failed write
                    for key, held in list(pending.items()):
                        pending.pop(key)
                        outcome = self._failure(err, held.attempts + 1, False)
                        self._record(rt, held, versions.get(key, held.want_version), outcome)
                    return
                plan = planner.plan(
                    rt.target,
                    rt.caps,
                    due,
                    server_refs=refs,
                    patient_ref=patient_ref,
                    encounter_refs=encounter_refs,
                )
            progressed = False
            due_by_key = {d.key: d for d in due}
            last_request = _last_request(plan.steps)
            for index, step in enumerate(plan.steps):
                if getattr(step, "awaiting", ()):
                    break  # its references are created by steps above: plan again with their ids
                outcomes: Iterable[tuple[str, _Outcome]]
                if isinstance(step, planner.Wait):
                    outcomes = [(step.key, self._waiting(rt, step, due_by_key.get(step.key), refs))]
                else:
                    hand_over = _HandOver(flush_all=index == last_request, watch=reserve_watch)
                    if _makes_request(step):
                        reserve_watch = None
                    outcomes = self._execute(rt, step, pending, hand_over)
                # (not a slice of self._results: earlier results may be written meanwhile)
                results: list[Result] = []
                for key, outcome in outcomes:
                    row = pending.pop(key, None)
                    if row is None:
                        continue
                    results.append(
                        self._record(rt, row, versions.get(key, row.want_version), outcome)
                    )
                event = audit.step_audit_event(
                    step,
                    target=rt.target.name,
                    results=results,
                    recorded=self.clock(),
                )
                if event is not None:
                    self._audits.append(event)
                progressed = True
                if isinstance(step, planner.MatchPatient):
                    # The rest of this plan is the patient gate's Waits: plan again, now that
                    # the match is recorded (server_refs gives the patient's server id).
                    break
            if not progressed:
                break
        for key, row in pending.items():
            # Nothing could be planned for it this pass (its dependencies are still missing).
            self._record(
                rt,
                row,
                versions.get(key, row.want_version),
                _Outcome(
                    "waiting",
                    error="waiting for a resource it references",
                    next_at=self.clock() + timedelta(seconds=30),
                    count_attempt=False,
                ),
            )

    def _due(
        self,
        rt: TargetRuntime,
        pending: dict[str, Delivery],
        versions: dict[str, int],
        stored: dict[tuple[str, str], planner.Due] | None = None,
    ) -> list[planner.Due]:
        """The pending rows' resources as stored (`stored`: read ahead, else read now); a row
        whose resource is no longer stored is recorded as skipped."""
        if stored is None:
            stored = _read_due(self.store, pending.values())
        due: list[planner.Due] = []
        for key, row in list(pending.items()):
            found = stored.get(row.key)
            if found is None:  # deleted, or gone, since it was queued
                pending.pop(key)
                self._record(
                    rt,
                    row,
                    row.want_version,
                    _Outcome("skipped", action="skip", error="no longer stored"),
                )
                continue
            versions[key] = int(found.version)
            due.append(found)
        return due

    def _reserve_ahead(self, rt: TargetRuntime, watch: frozenset[str]) -> None:
        """On the helper thread, while the current patient's request is on the wire: reserve
        the target's next patient, read its resources and plan them.

        The plan is kept only if it could not have changed by the time it is used: no resource
        of the current patient (`watch`, whose results were not written yet) among what it
        references, no encounter lookup (that would be a second request in flight)."""
        now = self.clock()
        rows = self.outbox.reserve(
            rt.target.name, owner=self.owner, now=now, limit=self.limit, lease=self.lease
        )
        if not rows:
            return
        ahead = self._ahead[rt.target.name] = _Ahead(rows, now, watch)
        # planned as `claim`'s rows would be: in flight
        ahead.stored = _read_due(
            self.store, [dataclasses.replace(r, status="in_flight") for r in rows]
        )
        due = [ahead.stored[r.key] for r in rows if r.key in ahead.stored]
        needed = _references(due)
        if not due or needed & watch or rt.caps.requires_existing_encounter:
            return
        refs = self.outbox.server_refs(rt.target.name, needed)
        plan = planner.plan(
            rt.target,
            rt.caps,
            due,
            server_refs=refs,
            patient_ref=refs.get(rows[0].patient_ref),
            encounter_refs={},
        )
        if not any(isinstance(step, planner.Wait) for step in plan.steps):
            # A Wait is planned again when used: what it waits for may have arrived meanwhile.
            ahead.refs, ahead.plan = refs, plan

    def _encounter_refs(
        self,
        rt: TargetRuntime,
        due: Sequence[planner.Due],
        patient_ref: str | None,
        cache: dict[str, str | None],
    ) -> dict[str, str]:
        """Our ``Encounter/id`` → the target's, where clinical writes need an existing encounter.

        Such a target (Epic) cannot take our Encounters: a record is filed against the hospital's
        encounter of the matched patient whose period contains our encounter's start, found by
        ``Encounter?patient=<server id>&date=le<our start>&date=ge<our start>``. None or several
        such: no entry, and the planner makes what needs it wait ("no matching encounter on
        target").
        """
        if not rt.caps.requires_existing_encounter or patient_ref is None:
            return {}
        out: dict[str, str] = {}
        for ref in sorted(r for r in _references(due) if r.startswith("Encounter/")):
            if ref not in cache:
                cache[ref] = self._find_encounter(rt, ref, patient_ref)
            found = cache[ref]
            if found is not None:
                out[ref] = found
        return out

    def _find_encounter(self, rt: TargetRuntime, ref: str, patient_ref: str) -> str | None:
        try:
            ours = self.store.read_stored("Encounter", ref.split("/", 1)[1]).resource()
        except (NotFoundError, GoneError):
            return None
        start = (ours.get("period") or {}).get("start")
        if not isinstance(start, str):
            return None
        try:
            at = parse_range(start)[0]
        except ValueError:
            return None
        # le + ge on the instant: the period overlaps both sides of it, i.e. contains it (an
        # open encounter, with no end, too; a bare `date=<day>` would need it inside that day)
        found = rt.client.search(
            "Encounter",
            {"patient": patient_ref.split("/", 1)[1], "date": [f"le{start}", f"ge{start}"]},
        )
        matches = {e["id"] for e in found if isinstance(e.get("id"), str) and _covers(e, at)}
        return f"Encounter/{matches.pop()}" if len(matches) == 1 else None

    def _waiting(
        self,
        rt: TargetRuntime,
        step: planner.Wait,
        due: planner.Due | None,
        known: Mapping[str, str],
    ) -> _Outcome:
        """A Wait, looked at again when what it waits for may have changed.

        Waiting for one of our own resources that another pass is delivering right now (queued
        or in flight, or delivered since the plan was made (not in ``known``, the server_refs
        the plan saw): e.g. a Practitioner shared by two patients that two workers deliver at
        once) is looked at again after DEPENDENCY_RECHECK; waiting for one that itself waits or
        retries, when that one is due; anything else (no matching patient or encounter on the
        target) after WAIT_RECHECK.
        """
        self._flush(rt)  # the ledger rows of what it waits for must be current
        now = self.clock()
        at = now + WAIT_RECHECK
        if due is not None:
            soon = now + DEPENDENCY_RECHECK
            keys = [
                (ref.split("/", 1)[0], ref.split("/", 1)[1])
                for ref in _references([due])
                if ref != due.key
            ]
            for (rtype, rid), dep in self.outbox.ledger(rt.target.name, keys).items():
                delivered_since = (
                    dep.status in ("sent", "fallback")
                    and dep.server_id is not None
                    and f"{rtype}/{rid}" not in known
                )
                if dep.status in ("queued", "in_flight") or delivered_since:
                    at = soon
                    break
                if dep.status in ("retrying", "waiting"):
                    at = min(at, max(soon, dep.next_attempt_at))
        return _Outcome("waiting", error=step.reason, next_at=at, count_attempt=False)

    def _record(self, rt: TargetRuntime, row: Delivery, version: int, o: _Outcome) -> Result:
        result = Result(
            (row.resource_type, row.resource_id),
            version,
            o.status,  # type: ignore[arg-type]
            server_id=o.server_id,
            server_version=o.server_version,
            action=o.action,
            error=o.error,
            next_attempt_at=o.next_at,
            count_attempt=o.count_attempt,
        )
        self._results.append(result)
        return result

    # ------------------------------------------------------------------ steps

    def _execute(
        self,
        rt: TargetRuntime,
        step: planner.Step,
        pending: dict[str, Delivery],
        hand_over: _HandOver | None = None,
    ) -> Iterator[tuple[str, _Outcome]]:
        keys = step.settles()
        attempts = {k: (pending[k].attempts if k in pending else 0) + 1 for k in keys}
        # A plain POST that cannot be searched for, on a row a crashed worker held, may already
        # be on the target: sending it again could put a second copy in a chart. Ops decide.
        doubtful = {k for k in _unverifiable_keys(step) if k in pending and pending[k].reclaimed}
        for key in sorted(doubtful):
            yield (
                key,
                _Outcome(
                    "dead",
                    error="outcome unknown: a previous worker stopped "
                    "while sending this record and the target cannot be searched "
                    "for it; check the target, then replay or discard",
                ),
            )
        if doubtful:
            remaining = _without(step, doubtful)
            if remaining is None:
                return
            step, keys = remaining, remaining.settles()
        posting = [tuple(k.split("/", 1)) for k in _unverifiable_keys(step)]
        self.outbox.mark_posting(
            rt.target.name, [(t, i) for t, i in posting], owner=self.owner, now=self.clock()
        )
        request = _makes_request(step)
        armed = request and hand_over is not None and self._arm(rt, hand_over)
        started = time.perf_counter()
        try:
            yield from self._run_step(rt, step, attempts)
        except EhrError as err:
            for key in keys:
                yield key, self._failure(err, attempts[key], _unverifiable(step))
        finally:
            if armed:
                rt.client.on_sent(None)
            if request:
                took, before = time.perf_counter() - started, self._waits.get(rt.target.name)
                self._waits[rt.target.name] = (
                    took if before is None else before + (took - before) / 4
                )

    def _arm(self, rt: TargetRuntime, hand_over: _HandOver) -> bool:
        """Hand over to the helper thread once the step's request is on the wire: started
        before, the helper's Python would compete with the sending of it for the interpreter.
        (A client without `on_sent`: now.) Only while the target's requests take at least
        OVERLAP_MIN_WAIT (not known yet: yes). True when armed."""
        if (
            not self._overlap
            or self._waits.get(rt.target.name, OVERLAP_MIN_WAIT) < OVERLAP_MIN_WAIT
        ):
            return False

        def go() -> None:
            self._hand_over(rt, flush_all=hand_over.flush_all, watch=hand_over.watch)

        on_sent = getattr(rt.client, "on_sent", None)
        if on_sent is None:
            go()
            return False
        on_sent(go)
        return True

    def _run_step(
        self, rt: TargetRuntime, step: planner.Step, attempts: dict[str, int]
    ) -> Iterator[tuple[str, _Outcome]]:
        client = rt.client
        if isinstance(step, planner.Wait):
            yield (
                step.key,
                _Outcome(
                    "waiting",
                    error=step.reason,
                    next_at=self.clock() + WAIT_RECHECK,
                    count_attempt=False,
                ),
            )
        elif isinstance(step, planner.Fallback):
            if step.action == "skip" or step.write is None:
                yield step.key, _Outcome("skipped", action="skip", error=step.reason)
                return
            for key, outcome in self._run_step(rt, step.write, attempts):
                if outcome.status == "sent":
                    yield (
                        key,
                        _Outcome(
                            "fallback",
                            server_id=outcome.server_id,
                            server_version=outcome.server_version,
                            action="note",
                            error=step.reason,
                        ),
                    )
                else:
                    yield key, outcome
        elif isinstance(step, planner.Transaction | planner.Batch):
            response = (
                client.transaction if isinstance(step, planner.Transaction) else client.batch
            )(step.bundle())
            results = entry_results(response.body or {})
            for entry, result in zip(step.entries, results, strict=False):
                if result.ok:
                    yield (
                        entry.key,
                        self._sent(entry.method, entry.url, result.location, result.etag),
                    )
                else:
                    assert result.error is not None
                    yield (
                        entry.key,
                        self._failure(result.error, attempts[entry.key], entry.unverifiable_retry),
                    )
        elif isinstance(step, planner.Single):
            headers = {}
            if step.if_match:
                headers["If-Match"] = step.if_match
            if step.if_none_exist:
                headers["If-None-Exist"] = step.if_none_exist
            response = client.request(step.method, step.url, json=step.body, headers=headers)
            yield step.key, self._sent_response(step.method, step.url, response)
        elif isinstance(step, planner.Update):
            headers = {"If-Match": step.if_match} if step.if_match else {}
            response = client.request("PUT", step.url, json=step.body, headers=headers)
            yield step.key, self._sent_response("PUT", step.url, response)
        elif isinstance(step, planner.SearchThenCreate):
            found = client.search(step.type, {"identifier": step.identifier})
            if len(found) > 1:
                yield (
                    step.key,
                    _Outcome(
                        "dead",
                        error=f"{len(found)} resources on the target "
                        "carry this identifier: resolve by hand",
                    ),
                )
                return
            if found:
                meta = found[0].get("meta") or {}
                yield (
                    step.key,
                    _Outcome(
                        "sent",
                        server_id=found[0].get("id"),
                        server_version=meta.get("versionId"),
                        action="matched",
                    ),
                )
                return
            response = client.request("POST", step.type, json=step.body)
            yield step.key, self._sent_response("POST", step.type, response)
        elif isinstance(step, planner.MatchPatient):
            found = client.search("Patient", {"identifier": step.identifier})
            if len(found) == 1:
                meta = found[0].get("meta") or {}
                yield (
                    step.key,
                    _Outcome(
                        "sent",
                        server_id=found[0].get("id"),
                        server_version=meta.get("versionId"),
                        action="matched",
                    ),
                )
            elif len(found) > 1:
                yield (
                    step.key,
                    _Outcome(
                        "dead",
                        error="several patients on the target match "
                        "the identifier: resolve by hand",
                    ),
                )
            elif step.create is not None:
                yield from self._run_step(rt, step.create, attempts)
            else:
                yield (
                    step.key,
                    _Outcome(
                        "waiting",
                        error="patient not found on the target",
                        next_at=self.clock() + WAIT_RECHECK,
                        count_attempt=False,
                    ),
                )
        else:  # pragma: no cover - every planner step kind is handled above
            raise AssertionError(type(step).__name__)

    # ------------------------------------------------------------------ outcomes

    def _sent_response(self, method: str, url: str, response: EhrResponse) -> _Outcome:
        return self._sent(method, url, response.location, response.etag)

    @staticmethod
    def _sent(method: str, url: str, location: Any, etag: str | None) -> _Outcome:
        server_id = location.id if location is not None else None
        if server_id is None and method == "PUT":
            server_id = url.rstrip("/").rsplit("/", 1)[-1]
        version = (
            location.version_id
            if location is not None and location.version_id
            else _etag_version(etag)
        )
        action = "put" if method == "PUT" else "create"
        return _Outcome("sent", server_id=server_id, server_version=version, action=action)

    def _failure(self, err: EhrError, attempts: int, unverifiable: bool) -> _Outcome:
        now = self.clock()
        decision = decide(err, attempts, now, self.rng, policy=self.policy)
        summary = f"{err.code}: {err.status or '-'} {err.summary}".strip()
        if isinstance(decision, RetryAt):
            return _Outcome("retrying", error=summary, next_at=decision.at)
        if isinstance(decision, ResolveUnknown):
            if unverifiable or not decision.may_resend:
                # A second POST of a record the target cannot be searched for could duplicate it.
                return _Outcome(
                    "dead",
                    error=f"{summary}; outcome unknown and cannot be "
                    "verified without risking a duplicate",
                )
            # PUT and conditional writes are idempotent; a search-then-create searches first.
            return _Outcome("retrying", error=summary, next_at=decision.at)
        assert isinstance(decision, DeadLetter)
        return _Outcome("dead", error=summary)


def _read_due(store: ResourceStore, rows: Iterable[Delivery]) -> dict[tuple[str, str], planner.Due]:
    """The rows' resources as stored now, by key, with what the ledger knows of each (a row
    whose resource is deleted, or gone, is missing)."""
    rows = list(rows)
    stored = store.read_stored_many([row.key for row in rows])
    out: dict[tuple[str, str], planner.Due] = {}
    for row in rows:
        found = stored.get(row.key)
        if found is None:
            continue
        ledger = planner.Ledger(
            server_id=row.server_id,
            server_version=row.server_version,
            sent_version=None if row.sent_version is None else str(row.sent_version),
            state=row.status,
        )
        out[row.key] = planner.Due(found.resource(), found.version_id, ledger)
    return out


def _planned_ahead(
    ahead: _Ahead | None, due: Sequence[planner.Due]
) -> tuple[dict[str, str], planner.Plan] | None:
    """The plan made ahead, if it is still the plan of exactly these due resources."""
    if ahead is None or ahead.plan is None or ahead.refs is None or ahead.stored is None:
        return None
    if len(due) != len(ahead.stored):  # a resource went since (recorded as skipped)
        return None
    return ahead.refs, ahead.plan


def _makes_request(step: planner.Step) -> bool:
    if isinstance(step, planner.Fallback):
        return step.action != "skip" and step.write is not None
    return not isinstance(step, planner.Wait)


def _last_request(steps: Sequence[planner.Step]) -> int:
    """The index of the plan's last step that makes a request this round (-1: none)."""
    last = -1
    for index, step in enumerate(steps):
        if getattr(step, "awaiting", ()):
            break
        if _makes_request(step):
            last = index
        if isinstance(step, planner.MatchPatient):
            break
    return last


def _give_back_at_exit(ref: weakref.ref[Worker]) -> None:
    """At interpreter exit (e.g. `fhirbridge worker --once`): give back what a worker still
    holds ahead, rather than leave it leased until the lease runs out."""
    worker = ref()
    if worker is None or not worker._ahead:
        return
    try:
        worker._give_back()
    except Exception as exc:
        log.warning("sync: giving back claimed rows failed: %s", type(exc).__name__)


def _covers(encounter: dict[str, Any], at: int) -> bool:
    """Whether the encounter's period contains the instant ``at`` (µs; an open end does)."""
    period = encounter.get("period") or {}
    try:
        if not isinstance(period.get("start"), str) or parse_range(period["start"])[0] > at:
            return False
        end = period.get("end")
        return not isinstance(end, str) or parse_range(end)[1] >= at
    except ValueError:
        return False


def _etag_version(etag: str | None) -> str | None:
    if not etag:
        return None
    return etag.removeprefix("W/").strip('"') or None


def _unverifiable_keys(step: planner.Step) -> set[str]:
    """The due resources this step would write by an unverifiable plain POST."""
    if isinstance(step, planner.Transaction | planner.Batch):
        return {e.key for e in step.entries if e.unverifiable_retry}
    if isinstance(step, planner.Fallback) and step.write is not None:
        return {step.key} if _unverifiable(step.write) else set()
    return set(step.settles()) if _unverifiable(step) else set()


def _without(step: planner.Step, keys: set[str]) -> planner.Step | None:
    """The step minus the writes of `keys` (None when nothing is left)."""
    if isinstance(step, planner.Transaction | planner.Batch):
        entries = tuple(e for e in step.entries if e.key not in keys)
        return dataclasses.replace(step, entries=entries) if entries else None
    return None if set(step.settles()) <= keys else step


def _unverifiable(step: planner.Step) -> bool:
    return bool(getattr(step, "unverifiable_retry", False))


def references_of(resources: Iterable[dict[str, Any]]) -> set[str]:
    """Every ``Type/id`` of the resources and every relative reference inside them."""
    refs: set[str] = set()
    for resource in resources:
        refs.add(f"{resource['resourceType']}/{resource['id']}")
        refs.update(planner.references(resource))
    return refs


def _references(due: Sequence[planner.Due]) -> set[str]:
    return references_of(d.resource for d in due)


__all__ = ["OutcomeUnknownError", "TargetRuntime", "Worker", "default_owner"]
