"""`store`: a ResourceStore on SQLite (tmp_path) and, when reachable, on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fhirbridge.store.resources import ResourceStore
from fhirbridge.store.schema import metadata


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ResourceStore]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    resource_store = ResourceStore.from_url(url)
    try:
        resource_store.create_schema()
        if request.param == "postgresql":  # the session schema is shared: start empty
            with resource_store.engine.begin() as conn:
                for table in reversed(metadata.sorted_tables):
                    conn.execute(table.delete())
        yield resource_store
    finally:
        resource_store.close()
