"""ResourceStore: versioned FHIR resources, submissions and the search index (SQLAlchemy Core).

SQLite is the embedded default (WAL, foreign keys, busy_timeout; writers take the lock up front
with BEGIN IMMEDIATE); PostgreSQL (psycopg 3) serves several instances: the current rows of a
submission's resources are locked with SELECT … FOR UPDATE in a fixed order, and a concurrent
first insert of the same resource or submission (unique violation), a deadlock or a
serialization failure retries the whole transaction.

Resources are stored as the exact JSON that is served (meta.versionId and meta.lastUpdated
included), so reads return those bytes without parsing; `*_stored` methods expose them, the
plain methods return parsed dicts. Nothing here logs or raises resource content.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, TypeVar

import orjson
from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Row,
    and_,
    bindparam,
    create_engine,
    delete,
    event,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

from fhirbridge.errors import GoneError, NotFoundError
from fhirbridge.store import search_sql
from fhirbridge.store.fhirdates import format_instant, micros, micros_to_datetime
from fhirbridge.store.query import SearchQuery
from fhirbridge.store.schema import metadata, resource_history, resources, search_index, submissions
from fhirbridge.store.search_params import REFERENCE_ROW, compartment_params, extract_index

__all__ = [
    "EVERYTHING_REFERENCED_TYPES",
    "Everything",
    "Outcome",
    "ResourceStore",
    "SaveResult",
    "SavedResource",
    "SearchPage",
    "StoredVersion",
]

log = logging.getLogger(__name__)

Outcome = Literal["created", "updated", "unchanged"]

# Resources outside the Patient compartment that $everything adds when the compartment
# references them.
EVERYTHING_REFERENCED_TYPES: tuple[str, ...] = ("Medication", "Practitioner")

MAX_ATTEMPTS = 5
SQLITE_BUSY_TIMEOUT_MS = 30_000
SQLITE_WAL_AUTOCHECKPOINT_PAGES = 1_000
_CHUNK = 500  # ids per IN (...) list: far below SQLite's and PostgreSQL's parameter limits
_RETRY_SQLSTATES = frozenset({"40001", "40P01"})  # serialization failure, deadlock
_WRITE_OPTION = "fhirbridge_write"

_r = resources.c
_h = resource_history.c
_si = search_index.c


@dataclass(frozen=True, slots=True)
class StoredVersion:
    """One stored version of a resource, its JSON exactly as served (None for a deletion)."""

    resource_type: str
    id: str
    version_id: str
    last_updated_us: int
    deleted: bool
    json: str | None
    outcome: str | None = None  # history only: created | updated | deleted

    @property
    def last_updated(self) -> str:
        """meta.lastUpdated (FHIR instant)."""
        return format_instant(self.last_updated_us)

    @property
    def last_modified(self) -> datetime:
        """meta.lastUpdated as an aware UTC datetime (for the Last-Modified header)."""
        return micros_to_datetime(self.last_updated_us)

    def resource(self) -> dict[str, Any]:
        """The parsed resource; raises GoneError for a deletion marker."""
        if self.json is None:
            raise GoneError("resource deleted")
        parsed: dict[str, Any] = orjson.loads(self.json)
        return parsed


@dataclass(frozen=True, slots=True)
class SavedResource:
    """What save_submission did with one resource."""

    resource_type: str
    id: str
    version_id: str
    outcome: Outcome


@dataclass(frozen=True, slots=True)
class SaveResult:
    """The outcome of save_submission.

    created=False: a submission with this source and content_hash already existed; its id is
    returned and the document was applied again (normally every resource "unchanged"; records
    changed since by other submissions are restored). `resources` and `stored_resources` follow
    the input order, one per resource: what was done, and the resource as it is now stored
    (meta.versionId/lastUpdated included).
    """

    created: bool
    submission_id: str
    resources: tuple[SavedResource, ...] = ()
    stored_resources: tuple[dict[str, Any], ...] = ()

    @property
    def changed(self) -> bool:
        """True when at least one resource was created or updated."""
        return any(r.outcome != "unchanged" for r in self.resources)


@dataclass(frozen=True, slots=True)
class SearchPage:
    """The total number of matches and the current versions of this page's resources."""

    total: int
    entries: tuple[StoredVersion, ...]

    @property
    def resources(self) -> list[dict[str, Any]]:
        """This page's resources, parsed."""
        return [e.resource() for e in self.entries]


@dataclass(frozen=True, slots=True)
class Everything:
    """Patient/$everything: `matches` = the Patient and its compartment, `included` = the
    Practitioners/Medications they reference."""

    matches: tuple[StoredVersion, ...]
    included: tuple[StoredVersion, ...]


@dataclass(frozen=True, slots=True)
class _Prepared:
    resource_type: str
    id: str
    resource: dict[str, Any]
    content_hash: str
    # Search-index rows, computed before the write lock is taken (they depend on nothing else).
    index_rows: tuple[dict[str, Any], ...]


@dataclass(slots=True)
class _State:
    version: int
    deleted: bool
    content_hash: str | None
    last_updated_us: int


def _content_hash(resource: Mapping[str, Any]) -> str:
    """sha256 of the resource without meta.versionId/meta.lastUpdated, keys sorted."""
    body = dict(resource)
    meta = body.get("meta")
    if isinstance(meta, dict):
        rest = {k: v for k, v in meta.items() if k not in ("versionId", "lastUpdated")}
        if rest:
            body["meta"] = rest
        else:
            del body["meta"]
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _with_meta(resource: Mapping[str, Any], version: int, instant: str) -> dict[str, Any]:
    """A copy with meta.versionId/lastUpdated set (other meta kept; meta placed after id)."""
    stamp = {"versionId": str(version), "lastUpdated": instant}
    old = resource.get("meta")
    meta = (
        {**stamp, **{k: v for k, v in old.items() if k not in stamp}}
        if isinstance(old, dict)
        else stamp
    )
    out: dict[str, Any] = {}
    for key, value in resource.items():
        if key == "meta":
            continue
        out[key] = value
        if key == "id":
            out["meta"] = meta
    if "meta" not in out:
        out["meta"] = meta
    return out


def _prepare(resource: Mapping[str, Any]) -> _Prepared:
    rtype, rid = resource.get("resourceType"), resource.get("id")
    if not isinstance(rtype, str) or not rtype or not isinstance(rid, str) or not rid:
        raise ValueError("every resource needs a string resourceType and id")
    rows = tuple(row.columns(rtype, rid) for row in extract_index(resource))
    return _Prepared(rtype, rid, dict(resource), _content_hash(resource), rows)


def keys_in(type_column: Any, id_column: Any) -> ColumnElement[bool]:
    """`type IN (…) AND id IN (…)`, with the expanding parameters `b_types` and `b_ids` that
    `key_lists` makes: an index lookup per pair on SQLite and PostgreSQL, where a row-value IN of
    the pairs, `(type, id) IN (VALUES …)`, is none on SQLite, which reads every row for it.
    It matches a superset of the pairs (the type of one with the id of another): keep only the
    rows whose key was asked for. Built into statements once; `key_lists` per execution."""
    return and_(
        type_column.in_(bindparam("b_types", expanding=True)),
        id_column.in_(bindparam("b_ids", expanding=True)),
    )


def key_lists(keys: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """The parameters of `keys_in` for these (type, id) pairs."""
    pairs = list(keys)
    return {"b_types": sorted({t for t, _ in pairs}), "b_ids": sorted({i for _, i in pairs})}


_STORED_BY_KEYS = select(
    _r.resource_type, _r.id, _r.version_id, _r.last_updated, _r.deleted, _r.content
).where(keys_in(_r.resource_type, _r.id))


_T = TypeVar("_T")


def _chunks(items: Sequence[_T]) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def _stored(row: Row[*tuple[Any, ...]], *, outcome: str | None = None) -> StoredVersion:
    return StoredVersion(
        resource_type=row.resource_type,
        id=row.id,
        version_id=str(row.version_id),
        last_updated_us=row.last_updated,
        deleted=bool(row.deleted) if outcome is None else outcome == "deleted",
        json=row.content,
        outcome=outcome,
    )


def _retryable(exc: DBAPIError) -> bool:
    if isinstance(exc, IntegrityError):
        return True  # a concurrent first insert of the same key: the retry sees it
    return getattr(exc.orig, "sqlstate", None) in _RETRY_SQLSTATES


def _set_wal(cursor: Any) -> None:
    """PRAGMA journal_mode=WAL, retried while the file is locked: switching a new database file
    to WAL does not wait on busy_timeout, so processes opening it together (gunicorn workers
    migrating a fresh volume) would fail with "database is locked". Once WAL, it is a no-op."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _configure_sqlite(engine: Engine, *, memory: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy emit BEGIN itself (see _on_begin); pysqlite's legacy mode would not.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            if not memory:
                _set_wal(cursor)
                cursor.execute("PRAGMA synchronous=NORMAL")
                # Checkpoint every 1,000 WAL pages (SQLite's default, stated on purpose): a
                # submission writes ~190 pages, so every fifth commit pays a checkpoint and its
                # fsync. 4,000 pages gave +4% requests/s but a p99 of 30 ms instead of 23 ms in
                # the API bench on a quiet machine: fewer checkpoints, each four times as long.
                cursor.execute(f"PRAGMA wal_autocheckpoint={SQLITE_WAL_AUTOCHECKPOINT_PAGES}")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        # Writers take the write lock at BEGIN (waiting up to busy_timeout) instead of failing
        # with SQLITE_BUSY when a read transaction later tries to upgrade.
        if connection.get_execution_options().get(_WRITE_OPTION, False):
            _begin_immediate(connection)
        else:
            connection.exec_driver_sql("BEGIN")


def _begin_immediate(connection: Connection) -> None:
    """BEGIN IMMEDIATE, retried every ~0.2 ms while another connection holds the write lock.

    SQLite's own busy handler sleeps 1, 2, 5, 10, 15, 20, 25… ms between attempts, so a writer
    queued behind a 4 ms transaction typically wakes at 8 ms and the lock sits idle in
    between, while every gunicorn worker's submission queues for it. Polling keeps the same
    bound (busy_timeout) and wakes within a fraction of a millisecond; each attempt costs
    microseconds. (API bench, 2 workers: ~1.3 ms of lock wait per request, ~+5% requests/s.)
    """
    raw = connection.connection.driver_connection
    assert raw is not None
    raw.execute("PRAGMA busy_timeout=0")
    try:
        deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
        while time.monotonic() < deadline:
            try:
                raw.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY:
                    break  # raised, wrapped as usual, by the attempt below
            time.sleep(0.0002)
        # The last attempt goes through SQLAlchemy, so a failure is its usual OperationalError.
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    finally:
        raw.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")


class ResourceStore:
    """Versioned FHIR resources with history, submissions and search (SQLite or PostgreSQL)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._lock_rows = engine.dialect.name == "postgresql"

    @classmethod
    def from_url(cls, url: str) -> ResourceStore:
        """A store for a SQLAlchemy URL: sqlite:///path (or sqlite:// in memory), or
        postgresql[+psycopg]://… ("postgresql://" and "postgres://" use psycopg 3)."""
        parsed = make_url(url)
        backend = parsed.get_backend_name()
        if backend in ("postgresql", "postgres"):
            if parsed.drivername in ("postgresql", "postgres"):
                parsed = parsed.set(drivername="postgresql+psycopg")
            # No server-side prepared statements: a generic plan cannot know how selective
            # a search value is, and picks index-order scans that read whole tables.
            engine = create_engine(
                parsed,
                pool_pre_ping=True,
                hide_parameters=True,  # bound values are patient data: never in logs or errors
                connect_args={"prepare_threshold": None},
            )
            return cls(engine)
        if backend == "sqlite":
            memory = parsed.database in (None, "", ":memory:") or (
                parsed.query.get("mode") == "memory"
            )
            if memory:
                engine = create_engine(
                    parsed,
                    poolclass=StaticPool,
                    hide_parameters=True,
                    connect_args={"check_same_thread": False},
                )
            else:
                engine = create_engine(parsed, hide_parameters=True)
            _configure_sqlite(engine, memory=memory)
            return cls(engine)
        raise ValueError(f"unsupported database backend: {backend!r} (use sqlite or postgresql)")

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (migrations, health checks, tests)."""
        return self._engine

    def create_schema(self) -> None:
        """Bring the schema to the latest Alembic migration (tests, benchmarks; the service
        and the CLI check or upgrade it through fhirbridge.db)."""
        from fhirbridge.db import upgrade

        upgrade(self)

    def ping(self) -> bool:
        """True when the database answers a trivial query (errors are logged by type only)."""
        try:
            with self._engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except SQLAlchemyError as exc:
            log.warning("database ping failed: %s", type(exc).__name__)
            return False
        return True

    def analyze(self) -> None:
        """Refresh the planner statistics of the store's tables (after a bulk load: PostgreSQL
        plans without statistics until autovacuum's first ANALYZE, and can pick index scans
        that read a whole table)."""
        with self._engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT")
            for table in metadata.sorted_tables:
                conn.exec_driver_sql(f"ANALYZE {table.name}")

    def close(self) -> None:
        """Close every pooled connection."""
        self._engine.dispose()

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction (SQLite: BEGIN IMMEDIATE), for modules sharing this database."""
        with self._write() as conn:
            yield conn

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._engine.connect() as conn:
            conn.execution_options(**{_WRITE_OPTION: True})
            with conn.begin():
                yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._engine.connect() as conn, conn.begin():
            yield conn

    # ------------------------------------------------------------------ writes

    def save_submission(
        self,
        *,
        submission_id: str,
        source: str,
        patient_id: str,
        content_hash: str,
        resources: Sequence[Mapping[str, Any]],
        summary: Mapping[str, Any],
        now: datetime,
        only_if_changed: Collection[str] = ("Provenance",),
        on_saved: Callable[[Connection, SaveResult], object] | None = None,
    ) -> SaveResult:
        """Store a submission and its resources in one transaction.

        A submission with the same `source` and `content_hash` is not stored twice
        (created=False, its id returned), but its document is applied again. Each resource is
        compared with its current version, ignoring meta.versionId/lastUpdated: identical →
        "unchanged" (nothing written); absent or deleted → "created"; different → "updated"
        (versionId + 1). Types in `only_if_changed` (the import's Provenance) are written only
        when some other resource changed. Written resources get meta.versionId and
        meta.lastUpdated (`now`, milliseconds), a history row and fresh search-index rows.
        `on_saved(conn, result)` runs inside the same transaction (e.g. to queue deliveries).
        """
        prepared = [_prepare(r) for r in resources]
        now_us = micros(now)
        now_us -= now_us % 1000
        summary_json = orjson.dumps(summary).decode()
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                with self._write() as conn:
                    result = self._save(
                        conn,
                        submission_id=submission_id,
                        source=source,
                        patient_id=patient_id,
                        content_hash=content_hash,
                        prepared=prepared,
                        summary_json=summary_json,
                        now=now,
                        now_us=now_us,
                        only_if_changed=frozenset(only_if_changed),
                    )
                    # Same transaction: accepting and queueing for delivery commit together.
                    if on_saved is not None:
                        on_saved(conn, result)
                    return result
            except DBAPIError as exc:
                if attempt == MAX_ATTEMPTS or not _retryable(exc):
                    raise
                log.info(
                    "save_submission: retrying after %s (attempt %d)",
                    type(exc.orig).__name__,
                    attempt,
                )
        raise AssertionError("unreachable")  # pragma: no cover

    def _save(
        self,
        conn: Connection,
        *,
        submission_id: str,
        source: str,
        patient_id: str,
        content_hash: str,
        prepared: list[_Prepared],
        summary_json: str,
        now: datetime,
        now_us: int,
        only_if_changed: frozenset[str],
    ) -> SaveResult:
        existing = conn.execute(
            select(submissions.c.id).where(
                submissions.c.source == source, submissions.c.content_hash == content_hash
            )
        ).scalar_one_or_none()
        submission_values = {"patient_id": patient_id, "received_at": now, "summary": summary_json}
        if existing is None:
            conn.execute(
                insert(submissions).values(
                    id=submission_id,
                    source=source,
                    content_hash=content_hash,
                    **submission_values,
                )
            )

        submission_id = existing or submission_id
        in_db = self._current_states(conn, prepared)
        state: dict[tuple[str, str], _State] = {
            k: _State(v.version, v.deleted, v.content_hash, v.last_updated_us)
            for k, v in in_db.items()
        }
        instant = format_instant(now_us)
        final: dict[tuple[str, str], tuple[_Prepared, str, str]] = {}  # key → (p, json, outcome)
        history_rows: list[dict[str, Any]] = []
        results: list[SavedResource] = []
        stored: list[dict[str, Any]] = []

        # Records of the import itself (Provenance) are written only when the import changed
        # something else, so that re-posting an identical document changes nothing at all.
        def same(p: _Prepared) -> bool:
            current = state.get((p.resource_type, p.id))
            return (
                current is not None
                and not current.deleted
                and current.content_hash == p.content_hash
            )

        changed = any(not same(p) for p in prepared if p.resource_type not in only_if_changed)
        keep_current = {
            (p.resource_type, p.id)
            for p in prepared
            if p.resource_type in only_if_changed
            and not changed
            and (p.resource_type, p.id) in state
            and not state[(p.resource_type, p.id)].deleted
        }
        current_json = self._current_json(conn, keep_current)
        for p in prepared:
            key = (p.resource_type, p.id)
            current = state.get(key)
            if key in keep_current:
                results.append(SavedResource(*key, str(state[key].version), "unchanged"))
                stored.append(orjson.loads(current_json[key]))
                continue
            if (
                current is not None
                and not current.deleted
                and current.content_hash == p.content_hash
            ):
                # Same content: the stored JSON is this resource with the current meta stamp.
                results.append(SavedResource(*key, str(current.version), "unchanged"))
                stamp = format_instant(current.last_updated_us)
                stored.append(_with_meta(p.resource, current.version, stamp))
                continue
            version = 1 if current is None else current.version + 1
            outcome: Outcome = "created" if current is None or current.deleted else "updated"
            resource = _with_meta(p.resource, version, instant)
            stored.append(resource)
            body = orjson.dumps(resource).decode()
            state[key] = _State(version, False, p.content_hash, now_us)
            final[key] = (p, body, outcome)
            history_rows.append(
                {
                    "resource_type": p.resource_type,
                    "id": p.id,
                    "version_id": version,
                    "last_updated": now_us,
                    "outcome": outcome,
                    "submission_id": submission_id,
                    "content": body,
                }
            )
            results.append(SavedResource(*key, str(version), outcome))

        # Writes in (type, id) order, so that concurrent transactions wait instead of deadlocking.
        inserts: list[dict[str, Any]] = []
        updates: list[dict[str, Any]] = []
        for key in sorted(final):
            p, body, _ = final[key]
            row = {
                "version_id": state[key].version,
                "last_updated": now_us,
                "deleted": False,
                "content_hash": p.content_hash,
                "content": body,
            }
            if key in in_db:
                updates.append(
                    {"k_type": key[0], "k_id": key[1], **{f"v_{k}": v for k, v in row.items()}}
                )
            else:
                inserts.append({"resource_type": key[0], "id": key[1], **row})
        if inserts:
            conn.execute(insert(resources), inserts)
        if updates:
            conn.execute(
                update(resources)
                .where(_r.resource_type == bindparam("k_type"), _r.id == bindparam("k_id"))
                .values(
                    version_id=bindparam("v_version_id"),
                    last_updated=bindparam("v_last_updated"),
                    deleted=bindparam("v_deleted"),
                    content_hash=bindparam("v_content_hash"),
                    content=bindparam("v_content"),
                ),
                updates,
            )
        if history_rows:
            history_rows.sort(key=lambda h: (h["resource_type"], h["id"], h["version_id"]))
            conn.execute(insert(resource_history), history_rows)
        self._reindex(conn, [k for k in sorted(final) if k in in_db], final)
        if existing is not None and final:
            # The same document applied again after others changed its records.
            conn.execute(
                update(submissions).where(submissions.c.id == existing).values(**submission_values)
            )
        return SaveResult(
            created=existing is None,
            submission_id=submission_id,
            resources=tuple(results),
            stored_resources=tuple(stored),
        )

    def _current_states(
        self, conn: Connection, prepared: list[_Prepared]
    ) -> dict[tuple[str, str], _State]:
        """The current version/hash of every resource of the submission: one query (per 500
        resources), rows locked on PostgreSQL, in (type, id) order. Exactly those rows, not
        `keys_in`'s superset: a lock on a row nobody asked for could only make others wait."""
        keys = sorted({(p.resource_type, p.id) for p in prepared})
        out: dict[tuple[str, str], _State] = {}
        for chunk in _chunks(keys):
            by_type: dict[str, list[str]] = defaultdict(list)
            for rtype, rid in chunk:
                by_type[rtype].append(rid)
            stmt = (
                select(
                    _r.resource_type,
                    _r.id,
                    _r.version_id,
                    _r.deleted,
                    _r.content_hash,
                    _r.last_updated,
                )
                .where(
                    or_(
                        *(and_(_r.resource_type == t, _r.id.in_(ids)) for t, ids in by_type.items())
                    )
                )
                .order_by(_r.resource_type, _r.id)
            )
            if self._lock_rows:
                stmt = stmt.with_for_update()
            for row in conn.execute(stmt):
                out[(row.resource_type, row.id)] = _State(
                    row.version_id, bool(row.deleted), row.content_hash, row.last_updated
                )
        return out

    def _current_json(
        self, conn: Connection, keys: Collection[tuple[str, str]]
    ) -> dict[tuple[str, str], str]:
        """The stored JSON of a few current resources (the import records kept as they are)."""
        out: dict[tuple[str, str], str] = {}
        for rtype, rid in sorted(keys):
            content = conn.execute(
                select(_r.content).where(_r.resource_type == rtype, _r.id == rid)
            ).scalar_one()
            out[(rtype, rid)] = content
        return out

    def _reindex(
        self,
        conn: Connection,
        existing: list[tuple[str, str]],
        final: Mapping[tuple[str, str], tuple[_Prepared, str, str]],
    ) -> None:
        by_type: dict[str, list[str]] = defaultdict(list)
        for rtype, rid in existing:
            by_type[rtype].append(rid)
        for rtype, ids in sorted(by_type.items()):
            for chunk in _chunks(ids):
                conn.execute(
                    delete(search_index).where(
                        _si.resource_type == rtype, _si.resource_id.in_(chunk)
                    )
                )
        rows = [row for key in sorted(final) for row in final[key][0].index_rows]
        if rows:
            conn.execute(insert(search_index), rows)

    def delete(self, rtype: str, rid: str, *, now: datetime) -> str | None:
        """Mark a resource deleted (new version, history entry, search rows removed).

        Returns the deletion's versionId, or None when it was already deleted.
        Raises NotFoundError when the resource never existed.
        """
        now_us = micros(now)
        now_us -= now_us % 1000
        with self._write() as conn:
            stmt = select(_r.version_id, _r.deleted).where(_r.resource_type == rtype, _r.id == rid)
            if self._lock_rows:
                stmt = stmt.with_for_update()
            row = conn.execute(stmt).one_or_none()
            if row is None:
                raise NotFoundError("resource not found")
            if row.deleted:
                return None
            version = row.version_id + 1
            conn.execute(
                update(resources)
                .where(_r.resource_type == rtype, _r.id == rid)
                .values(
                    version_id=version,
                    last_updated=now_us,
                    deleted=True,
                    content_hash=None,
                    content=None,
                )
            )
            conn.execute(
                insert(resource_history).values(
                    resource_type=rtype,
                    id=rid,
                    version_id=version,
                    last_updated=now_us,
                    outcome="deleted",
                    submission_id=None,
                    content=None,
                )
            )
            conn.execute(
                delete(search_index).where(_si.resource_type == rtype, _si.resource_id == rid)
            )
            return str(version)

    # ------------------------------------------------------------------ reads

    def get_submission(self, submission_id: str) -> dict[str, Any] | None:
        """The stored submission row (id, source, patient_id, content_hash, received_at as an
        aware UTC datetime, summary as a dict), or None."""
        with self._read() as conn:
            row = conn.execute(
                select(submissions).where(submissions.c.id == submission_id)
            ).one_or_none()
        if row is None:
            return None
        out = dict(row._mapping)
        out["summary"] = orjson.loads(out["summary"])
        return out

    def read_stored_many(
        self, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], StoredVersion]:
        """The current, not deleted, versions of several resources, by (type, id), in one
        query per chunk; absent or deleted ones are missing from the result."""
        found: dict[tuple[str, str], StoredVersion] = {}
        wanted = set(keys)
        if not wanted:
            return found
        with self._read() as conn:
            for chunk in _chunks(sorted(wanted)):
                for row in conn.execute(_STORED_BY_KEYS, key_lists(chunk)):
                    if not row.deleted and (row.resource_type, row.id) in wanted:
                        found[(row.resource_type, row.id)] = _stored(row)
        return found

    def read_stored(self, rtype: str, rid: str) -> StoredVersion:
        """The current version as stored. NotFoundError if absent, GoneError if deleted."""
        with self._read() as conn:
            row = conn.execute(
                select(
                    _r.resource_type, _r.id, _r.version_id, _r.last_updated, _r.deleted, _r.content
                ).where(_r.resource_type == rtype, _r.id == rid)
            ).one_or_none()
        if row is None:
            raise NotFoundError("resource not found")
        if row.deleted:
            raise GoneError("resource deleted")
        return _stored(row)

    def read(self, rtype: str, rid: str) -> dict[str, Any]:
        """The current version (with meta). NotFoundError if absent, GoneError if deleted."""
        return self.read_stored(rtype, rid).resource()

    def vread_stored(self, rtype: str, rid: str, vid: str) -> StoredVersion:
        """One version as stored. NotFoundError if there is no such version, GoneError if that
        version is a deletion."""
        if not vid.isascii() or not vid.isdigit() or len(vid) > 9:
            raise NotFoundError("version not found")
        with self._read() as conn:
            row = conn.execute(
                select(
                    _h.resource_type, _h.id, _h.version_id, _h.last_updated, _h.outcome, _h.content
                ).where(_h.resource_type == rtype, _h.id == rid, _h.version_id == int(vid))
            ).one_or_none()
        if row is None:
            raise NotFoundError("version not found")
        if row.outcome == "deleted":
            raise GoneError("resource deleted in this version")
        return _stored(row, outcome=row.outcome)

    def vread(self, rtype: str, rid: str, vid: str) -> dict[str, Any]:
        """One version of a resource (see vread_stored)."""
        return self.vread_stored(rtype, rid, vid).resource()

    def history_stored(self, rtype: str, rid: str) -> list[StoredVersion]:
        """Every version, newest first, deletions included (json None). NotFoundError if the
        resource never existed."""
        with self._read() as conn:
            rows = conn.execute(
                select(
                    _h.resource_type, _h.id, _h.version_id, _h.last_updated, _h.outcome, _h.content
                )
                .where(_h.resource_type == rtype, _h.id == rid)
                .order_by(_h.version_id.desc())
            ).all()
        if not rows:
            raise NotFoundError("resource not found")
        return [_stored(row, outcome=row.outcome) for row in rows]

    def history(self, rtype: str, rid: str) -> list[dict[str, Any]]:
        """Every stored version of the resource, newest first (deletion markers left out)."""
        return [v.resource() for v in self.history_stored(rtype, rid) if v.json is not None]

    def search(self, rtype: str, query: SearchQuery) -> SearchPage:
        """The total number of current resources of `rtype` matching `query`, and the page at
        query.offset of query.count resources (none when count is 0)."""
        columns = (_r.resource_type, _r.id, _r.version_id, _r.last_updated, _r.deleted, _r.content)
        with self._read() as conn:
            total = conn.execute(search_sql.count_statement(rtype, query)).scalar_one()
            if query.count == 0 or query.offset >= total:
                return SearchPage(total=total, entries=())
            rows = conn.execute(search_sql.page_statement(rtype, query, columns)).all()
        return SearchPage(total=total, entries=tuple(_stored(row) for row in rows))

    def everything_stored(
        self,
        patient_id: str,
        *,
        types: Collection[str] | None = None,
        since: datetime | None = None,
    ) -> Everything:
        """The Patient, every current resource in its compartment (a patient/subject reference
        to it), and the Practitioners/Medications those reference. `types` restricts the
        resource types returned, `since` to versions updated at or after it.
        NotFoundError / GoneError for an unknown / deleted Patient."""
        patient = self.read_stored("Patient", patient_id)
        ref = f"Patient/{patient_id}"
        compartment = or_(
            *(
                and_(_si.resource_type == rtype, _si.param.in_(names))
                for rtype, names in sorted(compartment_params().items())
            )
        )
        members = (
            select(_si.resource_type, _si.resource_id)
            .where(_si.ref == ref, compartment)
            .distinct()
            .subquery()
        )
        columns = (_r.resource_type, _r.id, _r.version_id, _r.last_updated, _r.deleted, _r.content)
        filters: list[ColumnElement[bool]] = [_r.deleted.is_(False)]
        if types is not None:
            filters.append(_r.resource_type.in_(sorted(types)))
        if since is not None:
            filters.append(_r.last_updated >= micros(since))
        member_stmt = (
            select(*columns)
            .join(
                members,
                and_(_r.resource_type == members.c.resource_type, _r.id == members.c.resource_id),
            )
            .where(*filters)
            .order_by(_r.resource_type, _r.id)
        )
        member_refs = search_index.alias("member_ref")
        referenced = (
            select(member_refs.c.system, member_refs.c.value)
            .join(
                members,
                and_(
                    member_refs.c.resource_type == members.c.resource_type,
                    member_refs.c.resource_id == members.c.resource_id,
                ),
            )
            .where(
                member_refs.c.param == REFERENCE_ROW,
                member_refs.c.system.in_(EVERYTHING_REFERENCED_TYPES),
            )
            .distinct()
            .subquery()
        )
        included_stmt = (
            select(*columns)
            .join(
                referenced,
                and_(_r.resource_type == referenced.c.system, _r.id == referenced.c.value),
            )
            .where(*filters)
            .order_by(_r.resource_type, _r.id)
        )
        with self._read() as conn:
            matched = [_stored(row) for row in conn.execute(member_stmt)]
            included = [_stored(row) for row in conn.execute(included_stmt)]
        keep_patient = (types is None or "Patient" in types) and (
            since is None or patient.last_updated_us >= micros(since)
        )
        head = (patient,) if keep_patient else ()
        return Everything(matches=(*head, *matched), included=tuple(included))

    def everything(
        self,
        patient_id: str,
        *,
        types: Collection[str] | None = None,
        since: datetime | None = None,
    ) -> list[dict[str, Any]]:
        """The Patient, its compartment and the Practitioners/Medications they reference,
        parsed (see everything_stored)."""
        result = self.everything_stored(patient_id, types=types, since=since)
        return [v.resource() for v in (*result.matches, *result.included)]
