"""Initial schema: resources, history, submissions, the search index and the sync ledger.

Exactly what fhirbridge/store/schema.py described when migrations were introduced (and what
metadata.create_all made before): a database created that way is adopted at this revision by
`fhirbridge db upgrade` (see fhirbridge.db). Generated with autogenerate, then reviewed: the
UtcDateTime column is its plain implementation type, so this file imports nothing of the app.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "submission",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("source", sa.String(length=255), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("content_hash", sa.String(length=128), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("summary", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_submission")),
        sa.UniqueConstraint(
            "source", "content_hash", name=op.f("uq_submission_source_content_hash")
        ),
    )
    op.create_index(op.f("ix_submission_patient_id"), "submission", ["patient_id"])

    op.create_table(
        "fhir_resource",
        sa.Column("resource_type", sa.String(length=64), nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("last_updated", sa.BigInteger(), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=True),
        sa.Column("content", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("resource_type", "id", name=op.f("pk_fhir_resource")),
    )
    op.create_index(
        op.f("ix_fhir_resource_resource_type_last_updated"),
        "fhir_resource",
        ["resource_type", "last_updated"],
    )

    op.create_table(
        "fhir_resource_history",
        sa.Column("resource_type", sa.String(length=64), nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("last_updated", sa.BigInteger(), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("submission_id", sa.String(length=64), nullable=True),
        sa.Column("content", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["submission_id"],
            ["submission.id"],
            name=op.f("fk_fhir_resource_history_submission_id_submission"),
        ),
        sa.PrimaryKeyConstraint(
            "resource_type", "id", "version_id", name=op.f("pk_fhir_resource_history")
        ),
    )
    op.create_index(
        op.f("ix_fhir_resource_history_submission_id"), "fhir_resource_history", ["submission_id"]
    )

    op.create_table(
        "fhir_search_index",
        sa.Column(
            "row_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("resource_type", sa.String(length=64), nullable=False),
        sa.Column("resource_id", sa.String(length=64), nullable=False),
        sa.Column("param", sa.String(length=64), nullable=False),
        sa.Column("system", sa.String(length=512), nullable=True),
        sa.Column("value", sa.String(length=512), nullable=True),
        sa.Column("date_lo", sa.BigInteger(), nullable=True),
        sa.Column("date_hi", sa.BigInteger(), nullable=True),
        sa.Column("ref", sa.String(length=129), nullable=True),
        sa.PrimaryKeyConstraint("row_id", name=op.f("pk_fhir_search_index")),
    )
    op.create_index(
        op.f("ix_fhir_search_index_resource_type_resource_id_param"),
        "fhir_search_index",
        ["resource_type", "resource_id", "param"],
    )
    op.create_index(
        op.f("ix_fhir_search_index_resource_type_param_value_system"),
        "fhir_search_index",
        ["resource_type", "param", "value", "system"],
    )
    op.create_index(
        op.f("ix_fhir_search_index_ref_resource_type_param"),
        "fhir_search_index",
        ["ref", "resource_type", "param"],
    )
    op.create_index(
        op.f("ix_fhir_search_index_resource_type_param_date_lo"),
        "fhir_search_index",
        ["resource_type", "param", "date_lo"],
    )
    op.create_index(
        op.f("ix_fhir_search_index_resource_type_param_date_hi"),
        "fhir_search_index",
        ["resource_type", "param", "date_hi"],
    )

    op.create_table(
        "sync_delivery",
        sa.Column("target", sa.String(length=64), nullable=False),
        sa.Column("resource_type", sa.String(length=64), nullable=False),
        sa.Column("resource_id", sa.String(length=64), nullable=False),
        sa.Column("patient_ref", sa.String(length=129), nullable=False),
        sa.Column("want_version", sa.Integer(), nullable=False),
        sa.Column("sent_version", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.BigInteger(), nullable=False),
        sa.Column("lease_owner", sa.String(length=64), nullable=True),
        sa.Column("lease_until", sa.BigInteger(), nullable=True),
        sa.Column("server_id", sa.String(length=512), nullable=True),
        sa.Column("server_version", sa.String(length=64), nullable=True),
        sa.Column("action", sa.String(length=32), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("queued_at", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "target", "resource_type", "resource_id", name=op.f("pk_sync_delivery")
        ),
    )
    op.create_index(
        op.f("ix_sync_delivery_status_next_attempt_at"),
        "sync_delivery",
        ["status", "next_attempt_at"],
    )
    op.create_index(
        op.f("ix_sync_delivery_target_patient_ref"), "sync_delivery", ["target", "patient_ref"]
    )


def downgrade() -> None:
    # A table's indexes go with it, on SQLite and PostgreSQL alike.
    for table in (
        "sync_delivery",
        "fhir_search_index",
        "fhir_resource_history",
        "fhir_resource",
        "submission",
    ):
        op.drop_table(table)
