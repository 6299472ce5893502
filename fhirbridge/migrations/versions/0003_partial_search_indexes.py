"""Partial indexes for reference and date search rows: every write touched them for nothing.

Each search-index row is a token, a reference or a date. The (ref, …), (…, date_lo) and
(…, date_hi) indexes held every row, the others under NULL, grouped by (resource_type, param):
a submission's ~70 rows landed on ~50 leaf pages of each of the two date indexes and ~46 of
the reference one. On SQLite each touched page is written to the WAL at commit and again at
checkpoint: of 287 pages a small submission wrote, 152 were these three indexes. Limited to
the rows they serve (WHERE ref / date_lo / date_hi IS NOT NULL), a submission writes 190 pages
and its commit costs half the CPU. Searches state the same condition (search_sql) so both
planners use them; no query looks up a NULL ref or date.

Plain CREATE INDEX (not CONCURRENTLY: a migration runs in one transaction): on PostgreSQL,
writes to fhir_search_index wait while the three indexes are rebuilt.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TABLE = "fhir_search_index"
# name, columns, the column that must be set
_INDEXES = (
    ("ix_fhir_search_index_ref_resource_type_param", ["ref", "resource_type", "param"], "ref"),
    (
        "ix_fhir_search_index_resource_type_param_date_lo",
        ["resource_type", "param", "date_lo"],
        "date_lo",
    ),
    (
        "ix_fhir_search_index_resource_type_param_date_hi",
        ["resource_type", "param", "date_hi"],
        "date_hi",
    ),
)


def upgrade() -> None:
    for name, columns, column in _INDEXES:
        op.drop_index(op.f(name), table_name=_TABLE)
        where = sa.text(f"{column} IS NOT NULL")
        op.create_index(op.f(name), _TABLE, columns, sqlite_where=where, postgresql_where=where)


def downgrade() -> None:
    for name, columns, _column in _INDEXES:
        op.drop_index(op.f(name), table_name=_TABLE)
        op.create_index(op.f(name), _TABLE, columns)
