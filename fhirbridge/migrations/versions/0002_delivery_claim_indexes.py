"""Indexes for the sync worker's claim: it read every row of the target it claimed for.

Outbox.claim runs two reads per claim. The target's oldest due row (ORDER BY next_attempt_at
LIMIT 1) used (target, patient_ref) and sorted all of the target's rows in a temporary B-tree;
that patient's due rows (ORDER BY resource_type, resource_id) walked the primary key filtered
by target alone. With 96k rows queued they took ~150 ms together on SQLite (the claim ~430 ms)
and the first ~60 ms on PostgreSQL (a sort on disk). With (target, next_attempt_at) and
(target, patient_ref, resource_type, resource_id) both are index range scans, without ANALYZE:
~0.2 ms together on SQLite, under 1 ms on PostgreSQL (which then sorts the one patient's rows).
The new patient index begins with the columns of (target, patient_ref), which it replaces.

Plain CREATE INDEX (not CONCURRENTLY: a migration runs in one transaction): on PostgreSQL,
writes to sync_delivery wait while the indexes are built (~0.4 s at 96k rows).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        op.f("ix_sync_delivery_target_next_attempt_at"),
        "sync_delivery",
        ["target", "next_attempt_at"],
    )
    op.create_index(
        op.f("ix_sync_delivery_target_patient_ref_resource_type_resource_id"),
        "sync_delivery",
        ["target", "patient_ref", "resource_type", "resource_id"],
    )
    op.drop_index(op.f("ix_sync_delivery_target_patient_ref"), table_name="sync_delivery")


def downgrade() -> None:
    op.create_index(
        op.f("ix_sync_delivery_target_patient_ref"), "sync_delivery", ["target", "patient_ref"]
    )
    op.drop_index(
        op.f("ix_sync_delivery_target_patient_ref_resource_type_resource_id"),
        table_name="sync_delivery",
    )
    op.drop_index(op.f("ix_sync_delivery_target_next_attempt_at"), table_name="sync_delivery")
