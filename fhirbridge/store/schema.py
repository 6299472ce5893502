"""The database layout, in one place: SQLAlchemy Core tables for resources, history, submissions
and the search index (Alembic migrations will be generated from this metadata).

Instants are stored as integer microseconds since 1970-01-01T00:00:00Z ("µs"): comparisons are
exact and identical on SQLite and PostgreSQL, whatever the offset the value was written with.
Resource JSON is stored exactly as it is served (meta included), so a read is one indexed select
and no re-serialization.

History and search-index rows carry no foreign key to the resource row on purpose: they are
written only by ResourceStore in the same transaction as the resource, and PostgreSQL checks a
foreign key per inserted row with a plan cached per connection, which is a sequential scan when
the connection first checked against a small table (a fresh database under bulk load became
quadratic: ~300 ms per 51-resource submission at 10k resources, against ~40 ms without).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.types import TypeDecorator

__all__ = [
    "ID_LENGTH",
    "INDEXED_TEXT_LENGTH",
    "OPEN_DELIVERY",
    "UtcDateTime",
    "delivery",
    "metadata",
    "resource_history",
    "resources",
    "search_index",
    "submissions",
]

ID_LENGTH = 64  # FHIR id: [A-Za-z0-9\-\.]{1,64}
TYPE_LENGTH = 64
# Longer token values are cut to this length on both sides (index and query): a PostgreSQL
# btree row must stay well under ~2.7 kB, and no code or identifier we serve comes close.
INDEXED_TEXT_LENGTH = 512
REF_LENGTH = TYPE_LENGTH + 1 + ID_LENGTH

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware datetime, stored in UTC, returned aware (UTC) on every backend."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: pass a timezone-aware value")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


submissions = Table(
    "submission",
    metadata,
    Column("id", String(ID_LENGTH), primary_key=True),
    Column("source", String(255), nullable=False),
    Column("patient_id", String(ID_LENGTH), nullable=False),
    Column("content_hash", String(128), nullable=False),
    Column("received_at", UtcDateTime(), nullable=False),
    Column("summary", Text, nullable=False),  # JSON (orjson)
    UniqueConstraint("source", "content_hash"),
    Index(None, "patient_id"),
    Index(None, "received_at"),  # the console's newest-first list (migration 0004)
)

# The current version of every resource (deleted ones keep their row, content NULL).
resources = Table(
    "fhir_resource",
    metadata,
    Column("resource_type", String(TYPE_LENGTH), primary_key=True),
    Column("id", String(ID_LENGTH), primary_key=True),
    Column("version_id", Integer, nullable=False),
    Column("last_updated", BigInteger, nullable=False),  # µs, UTC
    Column("deleted", Boolean, nullable=False, default=False),
    # sha256 of the resource without meta.versionId/meta.lastUpdated (keys sorted): "unchanged"
    # is decided by comparing hashes, without reading or parsing the stored JSON.
    Column("content_hash", String(64), nullable=True),
    Column("content", Text, nullable=True),  # the served JSON, meta included
    Index(None, "resource_type", "last_updated"),
)

# Every version ever written, including deletion markers (content NULL).
resource_history = Table(
    "fhir_resource_history",
    metadata,
    Column("resource_type", String(TYPE_LENGTH), primary_key=True),
    Column("id", String(ID_LENGTH), primary_key=True),
    Column("version_id", Integer, primary_key=True),
    Column("last_updated", BigInteger, nullable=False),  # µs, UTC
    Column("outcome", String(16), nullable=False),  # created | updated | deleted
    Column("submission_id", String(ID_LENGTH), ForeignKey(submissions.c.id), nullable=True),
    Column("content", Text, nullable=True),
    Index(None, "submission_id"),
)

# One row per indexed value of a search parameter of a current, non-deleted resource.
#   token:      system (NULL when the value has none), value
#   reference:  ref = "Type/id", value = id
#   date:       date_lo, date_hi = inclusive range in µs (open Period ends: MIN_US / MAX_US)
# Rows with param "~ref" list every literal reference of the resource (used by $everything).
search_index = Table(
    "fhir_search_index",
    metadata,
    Column(
        "row_id",
        BigInteger().with_variant(Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    Column("resource_type", String(TYPE_LENGTH), nullable=False),
    Column("resource_id", String(ID_LENGTH), nullable=False),
    Column("param", String(64), nullable=False),
    Column("system", String(INDEXED_TEXT_LENGTH), nullable=True),
    Column("value", String(INDEXED_TEXT_LENGTH), nullable=True),
    Column("date_lo", BigInteger, nullable=True),
    Column("date_hi", BigInteger, nullable=True),
    Column("ref", String(REF_LENGTH), nullable=True),
    Index(None, "resource_type", "resource_id", "param"),
    Index(None, "resource_type", "param", "value", "system"),
    # Partial: only reference rows have a ref, only date rows a range (a quarter and a sixth of
    # the rows). Whole-table indexes put every other row in too, under NULL, and each
    # submission then touched ~50 leaf pages of each for nothing (see migration 0003).
    Index(
        None,
        "ref",
        "resource_type",
        "param",
        sqlite_where=text("ref IS NOT NULL"),
        postgresql_where=text("ref IS NOT NULL"),
    ),
    Index(
        None,
        "resource_type",
        "param",
        "date_lo",
        sqlite_where=text("date_lo IS NOT NULL"),
        postgresql_where=text("date_lo IS NOT NULL"),
    ),
    Index(
        None,
        "resource_type",
        "param",
        "date_hi",
        sqlite_where=text("date_hi IS NOT NULL"),
        postgresql_where=text("date_hi IS NOT NULL"),
    ),
)

# The statuses of a delivery not settled yet, as SQL: the predicate of the partial claim index,
# which a query must state in these exact words for SQLite to use that index.
OPEN_DELIVERY = "status IN ('queued', 'retrying', 'waiting', 'in_flight')"

# The sync outbox and ledger: one row per (target, resource). Written in the same transaction
# as the resource version it asks to deliver; claimed by workers (FOR UPDATE SKIP LOCKED on
# PostgreSQL); it records what the target did with it. `last_error` holds a PHI-free summary.
#   status: queued | in_flight | sent | retrying | waiting | dead | fallback | skipped
delivery = Table(
    "sync_delivery",
    metadata,
    Column("target", String(64), primary_key=True),
    Column("resource_type", String(TYPE_LENGTH), primary_key=True),
    Column("resource_id", String(ID_LENGTH), primary_key=True),
    Column("patient_ref", String(REF_LENGTH), nullable=False),
    Column("want_version", Integer, nullable=False),
    Column("sent_version", Integer, nullable=True),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", BigInteger, nullable=False),  # µs
    Column("lease_owner", String(64), nullable=True),
    Column("lease_until", BigInteger, nullable=True),  # µs
    Column("server_id", String(INDEXED_TEXT_LENGTH), nullable=True),
    Column("server_version", String(64), nullable=True),
    Column("action", String(32), nullable=True),  # put | create | conditional-create | note | skip
    Column("last_error", Text, nullable=True),
    Column("queued_at", BigInteger, nullable=False),  # µs: when the wanted version was queued
    Column("updated_at", BigInteger, nullable=False),  # µs
    Index(None, "status", "next_attempt_at"),
    # Outbox.claim's two reads (migration 0002): the target's oldest due row, in next_attempt_at
    # order without a sort, then that patient's due rows. Without them both read every row of
    # the target: ~430 ms per claim at 96k rows queued, against ~0.2 ms for the two reads.
    # Only open rows (0005): settled rows keep the old next_attempt_at of their last attempt,
    # so in a whole-table index every claim and idle poll walked past all of them first.
    Index(
        None,
        "target",
        "next_attempt_at",
        sqlite_where=text(OPEN_DELIVERY),
        postgresql_where=text(OPEN_DELIVERY),
    ),
    Index(None, "target", "patient_ref", "resource_type", "resource_id"),
)
