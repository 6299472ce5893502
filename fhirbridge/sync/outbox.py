"""The sync outbox and ledger, in the service's own database.

`enqueue` runs inside the transaction that stores a submission, so a resource version is never
accepted without its deliveries being queued (and never queued without being stored). Workers
`claim` due rows under a lease: on PostgreSQL with FOR UPDATE SKIP LOCKED, so workers on several
machines share one queue without taking the same row; on SQLite writers are serialized anyway.
A row whose lease ran out (its worker died) is due again. Results are written back only by the
lease holder, and a version that arrived while a row was in flight re-queues it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import (
    BigInteger,
    Connection,
    Integer,
    Row,
    and_,
    bindparam,
    case,
    func,
    insert,
    or_,
    select,
    text,
    tuple_,
    update,
)

from fhirbridge.store.fhirdates import micros, micros_to_datetime
from fhirbridge.store.resources import ResourceStore, SaveResult, key_lists, keys_in
from fhirbridge.store.schema import OPEN_DELIVERY, delivery

log = logging.getLogger(__name__)

Status = Literal[
    "queued", "in_flight", "sent", "retrying", "waiting", "dead", "fallback", "skipped"
]
DUE_STATUSES = ("queued", "retrying", "waiting")
POSTING = "posting"  # ledger action while an unverifiable POST is on the wire
FINAL_STATUSES = ("sent", "dead", "fallback", "skipped")
_d = delivery.c


@dataclass(frozen=True, slots=True)
class Route:
    """Which resource types go to a target (None: every type)."""

    target: str
    resource_types: frozenset[str] | None = None

    def accepts(self, resource_type: str) -> bool:
        return self.resource_types is None or resource_type in self.resource_types


@dataclass(frozen=True, slots=True)
class Delivery:
    """One ledger row: where the delivery of one resource to one target stands."""

    target: str
    resource_type: str
    resource_id: str
    patient_ref: str
    want_version: int
    sent_version: int | None
    status: str
    attempts: int
    next_attempt_at: datetime
    server_id: str | None
    server_version: str | None
    action: str | None
    last_error: str | None
    queued_at: datetime
    updated_at: datetime
    # Taken over from a worker whose lease ran out: what it sent may have landed unrecorded.
    reclaimed: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.resource_type, self.resource_id)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "resourceType": self.resource_type,
            "id": self.resource_id,
            "status": self.status,
            "wantVersion": str(self.want_version),
            "sentVersion": None if self.sent_version is None else str(self.sent_version),
            "attempts": self.attempts,
            "nextAttemptAt": self.next_attempt_at.isoformat(),
            "serverId": self.server_id,
            "serverVersion": self.server_version,
            "action": self.action,
            "lastError": self.last_error,
            "updatedAt": self.updated_at.isoformat(),
        }


def _row(r: Any, status: str | None = None, reclaimed: bool = False) -> Delivery:
    return Delivery(
        target=r.target,
        resource_type=r.resource_type,
        resource_id=r.resource_id,
        patient_ref=r.patient_ref,
        want_version=r.want_version,
        sent_version=r.sent_version,
        status=r.status if status is None else status,
        attempts=r.attempts,
        next_attempt_at=micros_to_datetime(r.next_attempt_at),
        server_id=r.server_id,
        server_version=r.server_version,
        action=r.action,
        last_error=r.last_error,
        queued_at=micros_to_datetime(r.queued_at),
        updated_at=micros_to_datetime(r.updated_at),
        reclaimed=reclaimed,
    )


@dataclass(frozen=True, slots=True)
class Result:
    """The outcome of one delivery attempt, as the worker hands it to the ledger."""

    key: tuple[str, str]
    version: int
    status: Status
    server_id: str | None = None
    server_version: str | None = None
    action: str | None = None
    error: str | None = None
    next_attempt_at: datetime | None = None
    count_attempt: bool = True


# One UPDATE for every recorded row (executemany): every column is set, from the result or
# kept from the row, so all rows share one statement.
_RECORD = (
    update(delivery)
    .where(
        _d.target == bindparam("b_target"),
        _d.resource_type == bindparam("b_type"),
        _d.resource_id == bindparam("b_id"),
    )
    .values(
        status=bindparam("b_status"),
        lease_owner=None,
        lease_until=None,
        updated_at=bindparam("b_updated_at"),
        last_error=bindparam("b_error"),
        next_attempt_at=bindparam("b_next"),
        attempts=bindparam("b_attempts"),
        sent_version=bindparam("b_sent_version"),
        server_id=bindparam("b_server_id"),
        server_version=bindparam("b_server_version"),
        action=bindparam("b_action"),
    )
)


_BY_KEY = and_(
    _d.target == bindparam("b_target"),
    _d.resource_type == bindparam("b_type"),
    _d.resource_id == bindparam("b_id"),
)
# Row by row on the primary key (executemany): a row-value IN, `(type, id) IN (VALUES …)`,
# is not an index lookup on SQLite, which reads every row of the target for it instead.
_CLAIM = (
    update(delivery)
    .where(_BY_KEY)
    .values(
        status="in_flight",
        lease_owner=bindparam("b_owner"),
        lease_until=bindparam("b_until"),
        updated_at=bindparam("b_now"),
    )
)
_HELD = and_(_BY_KEY, _d.lease_owner == bindparam("b_owner"), _d.status == "in_flight")
_RESERVE = (
    update(delivery)
    .where(_BY_KEY)
    .values(lease_owner=bindparam("b_owner"), lease_until=bindparam("b_until"))
)
# A row taken over from a dead worker keeps its status (in flight) and a lease that has run out.
_UNRESERVE = (
    update(delivery)
    .where(_BY_KEY, _d.lease_owner == bindparam("b_owner"))
    .values(lease_owner=None, lease_until=case((_d.status == "in_flight", 0), else_=None))
)
_MARK_POSTING = (
    update(delivery)
    .where(_BY_KEY, _d.lease_owner == bindparam("b_owner"))
    .values(action=POSTING, updated_at=bindparam("b_now"))
)
_RELEASE = (
    update(delivery)
    .where(_HELD)
    .values(status="queued", lease_owner=None, lease_until=None, updated_at=bindparam("b_now"))
)


# The statements of the worker's every pass, built once (SQLAlchemy then reuses their
# compiled form without building and hashing a new expression each time).
_TARGET = _d.target == bindparam("b_target")
_KEYS = keys_in(_d.resource_type, _d.resource_id)  # parameters: key_lists(…)
_NOW: Any = bindparam("b_now", type_=BigInteger)
_DUE = or_(
    and_(
        _d.status.in_(DUE_STATUSES),
        _d.next_attempt_at <= _NOW,
        or_(_d.lease_until.is_(None), _d.lease_until < _NOW),  # reserved: not due
    ),
    and_(_d.status == "in_flight", _d.lease_until < _NOW),  # a dead worker's lease
)
_FIRST_DUE = (
    select(_d.patient_ref)
    # OPEN_DELIVERY, implied by `_DUE`, says so in the words of the partial index's WHERE.
    .where(_TARGET, text(OPEN_DELIVERY), _DUE)
    .order_by(_d.next_attempt_at)
    .limit(1)
    .with_for_update(skip_locked=True)
)
_PATIENT_DUE = (
    select(delivery)
    .where(_TARGET, _d.patient_ref == bindparam("b_patient"), _DUE)
    .order_by(_d.resource_type, _d.resource_id)
    .limit(bindparam("b_limit", type_=Integer, literal_execute=True))
    .with_for_update(skip_locked=True)
)
_TAKE = (
    update(delivery)
    .where(
        _TARGET,
        _d.patient_ref == bindparam("b_patient"),
        _d.lease_owner == bindparam("b_owner"),
        _d.lease_until >= _NOW,
        _d.status.in_((*DUE_STATUSES, "in_flight")),
    )
    .values(status="in_flight", lease_until=bindparam("b_until"), updated_at=_NOW)
)
_CURRENT = (
    select(
        _d.resource_type,
        _d.resource_id,
        _d.want_version,
        _d.sent_version,
        _d.lease_owner,
        _d.status,
        _d.attempts,
        _d.server_id,
        _d.server_version,
        _d.action,
    )
    .where(_TARGET, _KEYS)
    .with_for_update()
)
_LEDGER = select(delivery).where(_TARGET, _KEYS)
_SERVER_REFS = select(_d.resource_type, _d.resource_id, _d.server_id, _d.action).where(
    _TARGET,
    _KEYS,
    _d.server_id.is_not(None),
    _d.sent_version.is_not(None),
)


def _key_params(target: str, keys: Iterable[tuple[str, str]], **extra: Any) -> list[dict[str, Any]]:
    return [{"b_target": target, "b_type": t, "b_id": i, **extra} for t, i in keys]


def _result_params(r: Result, current: Any, now_us: int) -> dict[str, Any]:
    """The new column values of one ledger row, given its current values."""
    status: str = r.status
    attempts = current.attempts + 1 if r.count_attempt else current.attempts
    next_at = micros(r.next_attempt_at) if r.next_attempt_at else now_us
    sent_version, server_id = current.sent_version, current.server_id
    server_version, action = current.server_version, current.action
    if status in ("sent", "fallback", "skipped"):
        sent_version, attempts = r.version, 0
        if r.server_id is not None:
            server_id = r.server_id
        if r.server_version is not None:
            server_version = r.server_version
        if r.action is not None:
            action = r.action
        if current.want_version > r.version:
            status, next_at = "queued", now_us
    return {
        "b_type": current.resource_type,
        "b_id": current.resource_id,
        "b_status": status,
        "b_updated_at": now_us,
        "b_error": r.error,
        "b_next": next_at,
        "b_attempts": attempts,
        "b_sent_version": sent_version,
        "b_server_id": server_id,
        "b_server_version": server_version,
        "b_action": action,
    }


class Outbox:
    """Queue and ledger of deliveries, sharing the ResourceStore's database."""

    def __init__(self, store: ResourceStore, routes: Sequence[Route]) -> None:
        self.store = store
        self.routes = list(routes)

    # ------------------------------------------------------------------ enqueue

    def enqueue(
        self, conn: Connection, saved: SaveResult, *, patient_ref: str, now: datetime
    ) -> int:
        """Queue every created or updated resource for every target that takes its type.

        Call inside the transaction that stored `saved` (ResourceStore.save_submission's
        `on_saved`). Returns the number of rows queued or re-queued.
        """
        changed = [
            (r.resource_type, r.id, int(r.version_id))
            for r in saved.resources
            if r.outcome != "unchanged"
        ]
        return self.enqueue_versions(conn, changed, patient_ref=patient_ref, now=now)

    def enqueue_versions(
        self,
        conn: Connection,
        changed: Iterable[tuple[str, str, int]],
        *,
        patient_ref: str,
        now: datetime,
    ) -> int:
        wanted = [
            (route.target, rtype, rid, version)
            for rtype, rid, version in changed
            for route in self.routes
            if route.accepts(rtype)
        ]
        if not wanted:
            return 0
        now_us = micros(now)
        keys = [(t, rt, ri) for t, rt, ri, _ in wanted]
        wanted_keys = set(keys)
        existing: dict[tuple[str, str, str], str] = {}
        for chunk in _chunks(keys, 300):
            stmt = select(_d.target, _d.resource_type, _d.resource_id, _d.status).where(
                _d.target.in_(sorted({t for t, _, _ in chunk})),
                _KEYS,
            )
            for r in conn.execute(stmt, key_lists((rt, ri) for _, rt, ri in chunk)):
                key = (r.target, r.resource_type, r.resource_id)
                if key in wanted_keys:
                    existing[key] = r.status
        inserts = []
        for target, rtype, rid, version in sorted(wanted):
            key = (target, rtype, rid)
            if key not in existing:
                inserts.append(
                    {
                        "target": target,
                        "resource_type": rtype,
                        "resource_id": rid,
                        "patient_ref": patient_ref,
                        "want_version": version,
                        "sent_version": None,
                        "status": "queued",
                        "attempts": 0,
                        "next_attempt_at": now_us,
                        "queued_at": now_us,
                        "updated_at": now_us,
                    }
                )
                continue
            values: dict[str, Any] = {
                "want_version": version,
                "updated_at": now_us,
                "queued_at": now_us,
            }
            if existing[key] != "in_flight":
                # A new version starts afresh: earlier failures were about an older version.
                values.update(status="queued", attempts=0, next_attempt_at=now_us, last_error=None)
            conn.execute(
                update(delivery)
                .where(
                    _d.target == target,
                    _d.resource_type == rtype,
                    _d.resource_id == rid,
                )
                .values(**values)
            )
        if inserts:
            conn.execute(insert(delivery), inserts)
        return len(wanted)

    # ------------------------------------------------------------------ claim

    def claim(
        self,
        target: str,
        *,
        owner: str,
        now: datetime,
        limit: int = 100,
        lease: timedelta = timedelta(minutes=2),
    ) -> list[Delivery]:
        """Take up to `limit` due rows of one target, oldest first, under a lease for `owner`.

        Rows of one patient are claimed together (the patient with the oldest due row first),
        so the planner sees a resource together with what it references.
        """
        now_us = micros(now)
        rows = self._lease_due(
            _CLAIM, target, now_us, limit, b_owner=owner, b_until=micros(now + lease), b_now=now_us
        )
        return [_claimed(r) for r in rows]

    def _lease_due(
        self, stmt: Any, target: str, now_us: int, limit: int, **params: Any
    ) -> list[Row[Any]]:
        """The due rows of the target's next patient, `stmt` (claim or reserve) applied to them
        in the same transaction."""
        with self.store.write() as conn:
            rows = _due_patient(conn, target, now_us, limit)
            if rows:
                keys = ((r.resource_type, r.resource_id) for r in rows)
                conn.execute(stmt, _key_params(target, keys, **params))
        return rows

    def reserve(
        self,
        target: str,
        *,
        owner: str,
        now: datetime,
        limit: int = 100,
        lease: timedelta = timedelta(minutes=2),
    ) -> list[Delivery]:
        """The rows `claim` would take, kept for `owner` under a lease but not taken yet: no
        other worker claims them, and until `take` they stay what they were (not in flight).
        A worker reserves its next patient while it delivers one; if it dies, the lease runs
        out and the rows are due again, as they were."""
        now_us = micros(now)
        rows = self._lease_due(
            _RESERVE, target, now_us, limit, b_owner=owner, b_until=micros(now + lease)
        )
        return [_row(r, reclaimed=_in_doubt(r)) for r in rows]

    def take(
        self,
        target: str,
        reserved: Sequence[Delivery],
        *,
        owner: str,
        now: datetime,
        lease: timedelta = timedelta(minutes=2),
    ) -> list[Delivery] | None:
        """Claim rows `reserve` returned (one patient's), as `claim` would have: the claimed
        rows, or None (and nothing claimed) when the reservation did not hold for all of them
        (its lease ran out and another worker took one)."""
        if not reserved:
            return None
        now_us = micros(now)
        try:
            with self.store.write() as conn:
                taken = conn.execute(
                    _TAKE,
                    {
                        "b_target": target,
                        "b_patient": reserved[0].patient_ref,
                        "b_owner": owner,
                        "b_now": now_us,
                        "b_until": micros(now + lease),
                    },
                ).rowcount
                if taken != len(reserved):
                    raise _NotReserved
        except _NotReserved:
            return None
        return [replace(d, status="in_flight") for d in reserved]

    def unreserve(self, target: str, reserved: Iterable[Delivery], *, owner: str) -> None:
        """Give back rows `reserve` returned and `take` did not: their lease is dropped, and
        nothing else about them changes."""
        params = _key_params(target, (d.key for d in reserved), b_owner=owner)
        if params:
            with self.store.write() as conn:
                conn.execute(_UNRESERVE, params)

    def mark_posting(
        self, target: str, keys: Iterable[tuple[str, str]], *, owner: str, now: datetime
    ) -> None:
        """Record, before sending, that an unverifiable POST of these rows is about to start.

        If the worker dies before recording the answer, whoever takes the rows over knows the
        record may already be on the target (and dead-letters instead of POSTing it again).
        """
        params = _key_params(target, keys, b_owner=owner, b_now=micros(now))
        if not params:
            return
        with self.store.write() as conn:
            conn.execute(_MARK_POSTING, params)

    # ------------------------------------------------------------------ record results

    def record(
        self,
        target: str,
        key: tuple[str, str],
        *,
        owner: str,
        version: int,
        status: Status,
        now: datetime,
        server_id: str | None = None,
        server_version: str | None = None,
        action: str | None = None,
        error: str | None = None,
        next_attempt_at: datetime | None = None,
        count_attempt: bool = True,
    ) -> bool:
        """Write the outcome of one delivery attempt; False when `owner` no longer holds it.

        A version newer than `version` that arrived meanwhile sends the row back to queued.
        """
        result = Result(
            key,
            version,
            status,
            server_id=server_id,
            server_version=server_version,
            action=action,
            error=error,
            next_attempt_at=next_attempt_at,
            count_attempt=count_attempt,
        )
        return bool(self.record_many(target, [result], owner=owner, now=now))

    def record_many(
        self, target: str, results: Sequence[Result], *, owner: str, now: datetime
    ) -> set[tuple[str, str]]:
        """Write the outcomes of several delivery attempts in one transaction.

        One commit for a whole step (or round) of a worker instead of one per resource: the
        ledger write was the largest cost fhirbridge itself added to a sync. Returns the keys
        recorded; a row `owner` no longer holds (its lease ran out and another worker took
        it) is left alone.
        """
        if not results:
            return set()
        now_us = micros(now)
        by_key = {r.key: r for r in results}  # the last outcome for a key wins
        recorded: set[tuple[str, str]] = set()
        params: list[dict[str, Any]] = []
        with self.store.write() as conn:
            current_rows: list[Any] = []
            for chunk in _chunks(list(by_key), 500):
                current_rows += conn.execute(_CURRENT, {"b_target": target, **key_lists(chunk)})
            for current in current_rows:
                key = (current.resource_type, current.resource_id)
                if (
                    key not in by_key
                    or current.lease_owner != owner
                    or current.status != "in_flight"
                ):
                    continue
                params.append(_result_params(by_key[key], current, now_us))
                recorded.add(key)
            if params:
                conn.execute(_RECORD, [{"b_target": target, **p} for p in params])
        lost = len(by_key) - len(recorded)
        if lost:
            log.warning("lost the lease on %d deliveries to %s; results not recorded", lost, target)
        return recorded

    def release(
        self, target: str, keys: Iterable[tuple[str, str]], *, owner: str, now: datetime
    ) -> None:
        """Give back claimed rows untouched (e.g. a worker shutting down)."""
        params = _key_params(target, keys, b_owner=owner, b_now=micros(now))
        if not params:
            return
        with self.store.write() as conn:
            conn.execute(_RELEASE, params)

    # ------------------------------------------------------------------ reads

    def ledger(
        self, target: str, keys: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], Delivery]:
        out: dict[tuple[str, str], Delivery] = {}
        wanted = set(keys)
        if not wanted:
            return out
        with self.store.engine.connect() as conn:
            for chunk in _chunks(sorted(wanted), 300):
                for r in conn.execute(_LEDGER, {"b_target": target, **key_lists(chunk)}):
                    if (r.resource_type, r.resource_id) in wanted:
                        out[(r.resource_type, r.resource_id)] = _row(r)
        return out

    def server_refs(self, target: str, refs: Iterable[str]) -> dict[str, str]:
        """Our "Type/id" → the target's "Type/id", for what the target already has."""
        wanted = {(t, i) for t, _, i in (r.partition("/") for r in refs) if i}
        out: dict[str, str] = {}
        if not wanted:
            return out
        with self.store.engine.connect() as conn:
            for chunk in _chunks(sorted(wanted), 300):
                for t, i, server_id, action in conn.execute(
                    _SERVER_REFS, {"b_target": target, **key_lists(chunk)}
                ):
                    if (t, i) in wanted and server_id:
                        # a record delivered as a note lives on the target as that
                        # DocumentReference
                        out[f"{t}/{i}"] = (
                            f"{'DocumentReference' if action == 'note' else t}/{server_id}"
                        )
        return out

    def deliveries(
        self,
        *,
        target: str | None = None,
        status: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Delivery]:
        stmt = select(delivery)
        if target is not None:
            stmt = stmt.where(_d.target == target)
        if status is not None:
            stmt = stmt.where(_d.status == status)
        stmt = stmt.order_by(_d.updated_at.desc(), _d.resource_type, _d.resource_id)
        with self.store.engine.connect() as conn:
            return [_row(r) for r in conn.execute(stmt.limit(limit).offset(offset))]

    def for_resources(self, keys: Iterable[tuple[str, str]]) -> list[Delivery]:
        """Every target's row for these resources (the per-submission delivery view)."""
        out: list[Delivery] = []
        with self.store.engine.connect() as conn:
            for chunk in _chunks(list(keys), 300):
                out += [
                    _row(r)
                    for r in conn.execute(
                        select(delivery).where(tuple_(_d.resource_type, _d.resource_id).in_(chunk))
                    )
                ]
        return sorted(out, key=lambda d: (d.target, d.resource_type, d.resource_id))

    def summary(self, now: datetime) -> dict[str, dict[str, Any]]:
        """Per target: counts by status and the age of the oldest row still waiting."""
        out: dict[str, dict[str, Any]] = {r.target: _empty_summary() for r in self.routes}
        with self.store.engine.connect() as conn:
            for r in conn.execute(
                select(_d.target, _d.status, func.count(), func.min(_d.queued_at)).group_by(
                    _d.target, _d.status
                )
            ):
                entry = out.setdefault(r[0], _empty_summary())
                entry[r[1]] = entry.get(r[1], 0) + r[2]
                if r[1] not in FINAL_STATUSES and r[3] is not None:
                    age = (now - micros_to_datetime(r[3])).total_seconds()
                    entry["oldestWaitingSeconds"] = max(entry["oldestWaitingSeconds"] or 0, age)
        return out

    def activity(self) -> dict[str, dict[str, Any]]:
        """Per target: when a delivery last succeeded, and the latest failure still on a row.

        ``lastSuccessAt``: the newest ``updated_at`` of a row sent or delivered as a fallback.
        ``lastError``: the newest row that is retrying or dead-lettered, as ``at`` (its
        ``updated_at``), ``resourceType``, ``id``, ``status`` and ``error`` (``last_error``:
        error codes and an OperationOutcome summary, never patient data). Skipped and waiting
        rows carry a reason, not a failure, and are not counted here.
        """
        out: dict[str, dict[str, Any]] = {
            r.target: {"lastSuccessAt": None, "lastError": None} for r in self.routes
        }
        failing = and_(_d.status.in_(("retrying", "dead")), _d.last_error.is_not(None))
        with self.store.engine.connect() as conn:
            for target, last in conn.execute(
                select(_d.target, func.max(_d.updated_at))
                .where(_d.status.in_(("sent", "fallback")))
                .group_by(_d.target)
            ):
                entry = out.setdefault(target, {"lastSuccessAt": None, "lastError": None})
                entry["lastSuccessAt"] = micros_to_datetime(last)
            for target, newest in conn.execute(
                select(_d.target, func.max(_d.updated_at)).where(failing).group_by(_d.target)
            ):
                row = conn.execute(
                    select(_d.resource_type, _d.resource_id, _d.status, _d.last_error)
                    .where(_d.target == target, _d.updated_at == newest, failing)
                    .order_by(_d.resource_type, _d.resource_id)
                    .limit(1)
                ).first()
                if row is None:  # changed between the two reads
                    continue
                entry = out.setdefault(target, {"lastSuccessAt": None, "lastError": None})
                entry["lastError"] = {
                    "at": micros_to_datetime(newest),
                    "resourceType": row.resource_type,
                    "id": row.resource_id,
                    "status": row.status,
                    "error": row.last_error,
                }
        return out

    def replay(self, target: str, keys: Iterable[tuple[str, str]] | None, *, now: datetime) -> int:
        """Send dead letters again (all of the target's when keys is None)."""
        now_us = micros(now)
        stmt = update(delivery).where(_d.target == target, _d.status == "dead")
        if keys is not None:
            stmt = stmt.where(tuple_(_d.resource_type, _d.resource_id).in_(list(keys)))
        with self.store.write() as conn:
            result = conn.execute(
                stmt.values(status="queued", attempts=0, next_attempt_at=now_us, updated_at=now_us)
            )
        return int(result.rowcount or 0)


class _NotReserved(Exception):
    """Rolls back a `take` that would claim only part of a reservation."""


def _due_patient(conn: Connection, target: str, now_us: int, limit: int) -> list[Row[Any]]:
    """The due rows, locked, of the target's patient with the oldest due row (up to `limit`)."""
    first = conn.execute(_FIRST_DUE, {"b_target": target, "b_now": now_us}).first()
    if first is None:
        return []
    params = {"b_target": target, "b_now": now_us, "b_patient": first.patient_ref}
    return list(conn.execute(_PATIENT_DUE, {**params, "b_limit": limit}).all())


def _in_doubt(r: Any) -> bool:
    # Only a row whose worker had started an unverifiable POST is in doubt.
    return bool(r.status == "in_flight" and r.action == POSTING)


def _claimed(r: Any) -> Delivery:
    return _row(r, status="in_flight", reclaimed=_in_doubt(r))


def _empty_summary() -> dict[str, Any]:
    return {
        "queued": 0,
        "in_flight": 0,
        "sent": 0,
        "retrying": 0,
        "waiting": 0,
        "dead": 0,
        "fallback": 0,
        "skipped": 0,
        "oldestWaitingSeconds": None,
    }


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def utcnow() -> datetime:
    return datetime.now(UTC)
