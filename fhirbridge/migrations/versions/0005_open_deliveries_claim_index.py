"""The claim's (target, next_attempt_at) index holds only open deliveries.

A settled delivery (sent, dead, fallback, skipped) keeps the next_attempt_at of its last
attempt, which is older than any row queued since. Outbox.claim reads the target's oldest due
row in next_attempt_at order, so with 0002's whole-table index every claim, and every idle
poll of a drained queue, walked past all settled rows first: 96k sent rows and 54 new ones
cost ~28 ms for that read and ~60 ms per claim on SQLite, growing with the ledger's history.
Limited to open rows (WHERE status IN the four open statuses, which the claim states in the
same words), the read touches only what can be due.

Plain CREATE INDEX (not CONCURRENTLY: a migration runs in one transaction): on PostgreSQL,
writes to sync_delivery wait while it is rebuilt.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NAME = "ix_sync_delivery_target_next_attempt_at"
# Written out, not imported: a revision keeps what it did when schema.py changes later.
_OPEN = "status IN ('queued', 'retrying', 'waiting', 'in_flight')"


def upgrade() -> None:
    op.drop_index(op.f(_NAME), table_name="sync_delivery")
    where = sa.text(_OPEN)
    op.create_index(
        op.f(_NAME),
        "sync_delivery",
        ["target", "next_attempt_at"],
        sqlite_where=where,
        postgresql_where=where,
    )


def downgrade() -> None:
    op.drop_index(op.f(_NAME), table_name="sync_delivery")
    op.create_index(op.f(_NAME), "sync_delivery", ["target", "next_attempt_at"])
