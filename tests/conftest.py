"""Shared fixture: `postgres_url`, a throwaway schema on a reachable PostgreSQL, else a skip.

FHIRBRIDGE_TEST_POSTGRES_URL overrides the default postgresql+psycopg://postgres@127.0.0.1:5432/test.
One schema per test session (fhirbridge_test_<random>), selected through the connection's
search_path and dropped at the end; tests that share it clean the tables themselves.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.exc import SQLAlchemyError

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A SQLAlchemy URL whose connections use a fresh, session-private schema."""
    url = make_url(os.environ.get("FHIRBRIDGE_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL))
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    where = f"{url.host or 'localhost'}:{url.port or 5432}/{url.database}"
    schema = f"fhirbridge_test_{uuid.uuid4().hex[:12]}"
    engine = create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except (SQLAlchemyError, ImportError) as exc:
        engine.dispose()
        pytest.skip(f"PostgreSQL not reachable at {where}: {type(exc).__name__}: {exc}")
    try:
        yield url.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
            hide_password=False
        )
    finally:
        with engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()
