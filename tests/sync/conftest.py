"""`store`: a ResourceStore on SQLite and, when reachable, on the real PostgreSQL."""

from __future__ import annotations

from tests.store.conftest import store  # noqa: F401 - the same contract fixture
