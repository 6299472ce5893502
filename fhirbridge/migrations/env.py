"""Alembic environment: migrations run on the connection fhirbridge.db hands over.

No URL and no engine here: fhirbridge.db opens the connection from the service's own store
(so an in-memory sqlite:// database is the one the app uses, and the caller's transaction and
lock cover the whole upgrade) and passes it in `config.attributes["connection"]`.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from fhirbridge.store.schema import metadata


def run_migrations() -> None:
    if context.is_offline_mode():
        raise RuntimeError("offline (--sql) migrations are not supported: use `fhirbridge db`")
    connection = context.config.attributes.get("connection")
    if not isinstance(connection, Connection):
        raise RuntimeError("run migrations through `fhirbridge db` (fhirbridge.db)")
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite cannot ALTER most things: future revisions recreate the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
