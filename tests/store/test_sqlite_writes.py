"""SQLite write transactions across connections (as gunicorn workers and the sync worker are):
a writer waits for another's write lock and then commits, gives up with SQLAlchemy's usual
OperationalError after the busy timeout, and leaves its connection as it found it."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.exc import OperationalError

from fhirbridge.store import resources as store_module
from fhirbridge.store.resources import ResourceStore
from fhirbridge.store.schema import submissions


@pytest.fixture
def path(tmp_path: Path) -> Path:
    db = tmp_path / "writes.db"
    ResourceStore.from_url(f"sqlite:///{db}").create_schema()
    return db


@pytest.fixture
def store(path: Path) -> Iterator[ResourceStore]:
    store = ResourceStore.from_url(f"sqlite:///{path}")
    yield store
    store.close()


def _row(n: int) -> dict[str, object]:
    return {
        "id": f"s{n}",
        "source": "test",
        "patient_id": "p",
        "content_hash": f"h{n}",
        "received_at": datetime(2026, 1, 1, tzinfo=UTC),
        "summary": "{}",
    }


def _hold_write_lock(path: Path, seconds: float, started: threading.Event) -> None:
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO submission VALUES ('held', 'other', 'p', 'h', '1970', '{}')")
    started.set()
    time.sleep(seconds)
    other.execute("COMMIT")
    other.close()


def test_a_writer_waits_for_another_connections_write_lock_then_commits(
    path: Path, store: ResourceStore
) -> None:
    started = threading.Event()
    holder = threading.Thread(target=_hold_write_lock, args=(path, 0.3, started))
    holder.start()
    started.wait(5)
    begun = time.monotonic()
    with store.write() as conn:
        waited = time.monotonic() - begun
        conn.execute(insert(submissions).values(**_row(1)))
    holder.join()
    assert waited >= 0.25  # it did wait for the other transaction (no error, no dirty read)
    with store.engine.connect() as conn:
        ids = set(conn.execute(select(submissions.c.id)).scalars())
        timeout = conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one()
    assert ids == {"held", "s1"}
    assert timeout == store_module.SQLITE_BUSY_TIMEOUT_MS  # restored after the wait


def test_a_writer_gives_up_after_the_busy_timeout_with_sqlalchemys_error(
    path: Path, store: ResourceStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "SQLITE_BUSY_TIMEOUT_MS", 200)
    started = threading.Event()
    holder = threading.Thread(target=_hold_write_lock, args=(path, 1.0, started))
    holder.start()
    started.wait(5)
    try:
        with pytest.raises(OperationalError, match="locked"), store.write() as conn:
            conn.execute(insert(submissions).values(**_row(2)))
    finally:
        holder.join()
    with store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(submissions)).scalar_one() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one() == 200
    # The same pooled connection writes again once the lock is free.
    with store.write() as conn:
        conn.execute(insert(submissions).values(**_row(3)))


def test_write_connections_checkpoint_at_the_configured_wal_size(store: ResourceStore) -> None:
    with store.engine.connect() as conn:
        pages = conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar_one()
        mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar_one()
    assert (mode, pages) == ("wal", store_module.SQLITE_WAL_AUTOCHECKPOINT_PAGES)
