"""The store's tables as fhirbridge/store/schema.py declared them before migrations existed.

Frozen (schema.py at the commit before c3abfdc, comments dropped): fhirbridge then made its
tables with this metadata's create_all, so a database it made is this. The migration tests
build their pre-migration databases from it, and check it is exactly what revision 0001 (the
baseline adoption compares with) makes. Never edit it to follow schema.py: later revisions
change schema.py, not the databases made before them. The one liberty: received_at is the
plain DateTime(timezone=True) that UtcDateTime decorated, which renders the same DDL.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

submissions = Table(
    "submission",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("source", String(255), nullable=False),
    Column("patient_id", String(64), nullable=False),
    Column("content_hash", String(128), nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("summary", Text, nullable=False),
    UniqueConstraint("source", "content_hash"),
    Index(None, "patient_id"),
)

Table(
    "fhir_resource",
    metadata,
    Column("resource_type", String(64), primary_key=True),
    Column("id", String(64), primary_key=True),
    Column("version_id", Integer, nullable=False),
    Column("last_updated", BigInteger, nullable=False),
    Column("deleted", Boolean, nullable=False, default=False),
    Column("content_hash", String(64), nullable=True),
    Column("content", Text, nullable=True),
    Index(None, "resource_type", "last_updated"),
)

Table(
    "fhir_resource_history",
    metadata,
    Column("resource_type", String(64), primary_key=True),
    Column("id", String(64), primary_key=True),
    Column("version_id", Integer, primary_key=True),
    Column("last_updated", BigInteger, nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("submission_id", String(64), ForeignKey(submissions.c.id), nullable=True),
    Column("content", Text, nullable=True),
    Index(None, "submission_id"),
)

Table(
    "fhir_search_index",
    metadata,
    Column(
        "row_id",
        BigInteger().with_variant(Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    Column("resource_type", String(64), nullable=False),
    Column("resource_id", String(64), nullable=False),
    Column("param", String(64), nullable=False),
    Column("system", String(512), nullable=True),
    Column("value", String(512), nullable=True),
    Column("date_lo", BigInteger, nullable=True),
    Column("date_hi", BigInteger, nullable=True),
    Column("ref", String(129), nullable=True),
    Index(None, "resource_type", "resource_id", "param"),
    Index(None, "resource_type", "param", "value", "system"),
    Index(None, "ref", "resource_type", "param"),
    Index(None, "resource_type", "param", "date_lo"),
    Index(None, "resource_type", "param", "date_hi"),
)

Table(
    "sync_delivery",
    metadata,
    Column("target", String(64), primary_key=True),
    Column("resource_type", String(64), primary_key=True),
    Column("resource_id", String(64), primary_key=True),
    Column("patient_ref", String(129), nullable=False),
    Column("want_version", Integer, nullable=False),
    Column("sent_version", Integer, nullable=True),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", BigInteger, nullable=False),
    Column("lease_owner", String(64), nullable=True),
    Column("lease_until", BigInteger, nullable=True),
    Column("server_id", String(512), nullable=True),
    Column("server_version", String(64), nullable=True),
    Column("action", String(32), nullable=True),
    Column("last_error", Text, nullable=True),
    Column("queued_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
    Index(None, "status", "next_attempt_at"),
    Index(None, "target", "patient_ref"),
)
