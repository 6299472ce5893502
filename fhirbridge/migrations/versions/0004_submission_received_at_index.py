"""Index submission.received_at: the ops console lists the newest submissions first.

`/ui` shows the 20 newest submissions (ORDER BY received_at DESC LIMIT 20). Without an index
every page view read and sorted the whole submission table; with it, the newest rows are read
from the end of the index. received_at only grows, so each submission adds its entry to the
last leaf page: about one page more per commit.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(op.f("ix_submission_received_at"), "submission", ["received_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_submission_received_at"), table_name="submission")
