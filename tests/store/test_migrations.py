"""Alembic migrations on SQLite and the real PostgreSQL: head is exactly schema.py, down to base
and up again, concurrent upgrades, adopting a pre-migration database, behind and unknown
revisions, writing the next revision; the head read from the version files (as alembic reads
it, without importing alembic on start-up); the start-up refusal, `fhirbridge db`, and /readyz
when the database is behind; each shipped revision from the one before and back, data kept.

The comparison test is what makes a change to schema.py without a migration fail CI.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from click.testing import CliRunner
from sqlalchemy import (
    Column,
    Integer,
    Table,
    create_engine,
    event,
    inspect,
    make_url,
    select,
    text,
)

from fhirbridge import create_app, db
from fhirbridge.cli import main
from fhirbridge.settings import Settings
from fhirbridge.store.resources import ResourceStore
from fhirbridge.store.schema import delivery, metadata, submissions
from fhirbridge.sync.outbox import Outbox, Route
from tests.store import pre_migration_schema

ROOT = Path(__file__).resolve().parents[2]
OURS = set(metadata.tables)
SHIPPED = db.head()  # the latest revision in fhirbridge/migrations
# Revisions the tests write after the shipped ones (numbers no shipped file uses).
NEXT, AFTER_NEXT, THIRD_AFTER = (f"{int(SHIPPED) + n:04d}" for n in (1, 2, 3))


@pytest.fixture
def pg_private_url(postgres_url: str) -> Iterator[str]:
    """A schema of its own (the session schema is shared with tests that create tables)."""
    url = make_url(postgres_url)
    schema = f"fhirbridge_mig_{uuid.uuid4().hex[:10]}"
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield url.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
            hide_password=False
        )
    finally:
        with engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'migrations.db'}"
    value: str = request.getfixturevalue("pg_private_url")
    return value


@pytest.fixture
def store(url: str) -> Iterator[ResourceStore]:
    resource_store = ResourceStore.from_url(url)
    try:
        yield resource_store
    finally:
        resource_store.close()


def _diff(store: ResourceStore) -> list[Any]:
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, metadata))


def _tables(store: ResourceStore) -> set[str]:
    return set(inspect(store.engine).get_table_names())


def _index_predicates(store: ResourceStore) -> dict[str, str]:
    """Every index of ours in the database and its WHERE ("": a whole-table index), as the
    adoption check reflects them. compare_metadata does not compare predicates."""
    with store.engine.connect() as conn:
        shape = db.schema_shape(conn, OURS)
    return {name: where for table in shape.values() for name, _, _, where in table["indexes"]}


def _declared_predicates(dialect: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for table in metadata.tables.values():
        for index in table.indexes:
            where = index.dialect_options[dialect]["where"]
            out[str(index.name)] = "" if where is None else db.normal_predicate(str(where))
    return out


def test_upgrade_head_is_exactly_schema_py(store: ResourceStore) -> None:
    assert db.state(store).kind == "empty"
    before, after = db.upgrade(store)
    assert (before.kind, before.current) == ("empty", None)
    assert (after.kind, after.current) == ("current", db.head())
    assert _diff(store) == []
    declared = _declared_predicates(store.engine.dialect.name)
    assert _index_predicates(store) == declared
    assert sum(1 for where in declared.values() if where) == 4  # the partial ones are compared
    assert _tables(store) == OURS | {"alembic_version"}
    if store.engine.dialect.name == "postgresql":  # in the search_path schema, not public
        with store.engine.connect() as conn:
            found = conn.execute(text("SELECT to_regclass('alembic_version')::text")).scalar()
            schema = conn.execute(text("SELECT current_schema()")).scalar_one()
        assert schema.startswith("fhirbridge_mig_")
        assert found == "alembic_version"  # unqualified: it is in the first search_path schema
        assert "alembic_version" in inspect(store.engine).get_table_names(schema=schema)


def test_upgrade_at_head_changes_nothing(store: ResourceStore) -> None:
    db.upgrade(store)
    before, after = db.upgrade(store)
    assert before.at_head and after.at_head


def test_downgrade_to_base_and_up_again(store: ResourceStore) -> None:
    db.upgrade(store)
    db.downgrade(store, "base")
    assert _tables(store) <= {"alembic_version"}
    assert db.state(store).kind == "empty"
    db.upgrade(store)
    assert _diff(store) == []


def test_concurrent_upgrades_migrate_once(url: str) -> None:
    """As gunicorn workers auto-upgrading a fresh database: one migrates, the others wait."""
    stores = [ResourceStore.from_url(url) for _ in range(4)]
    start = threading.Barrier(len(stores))
    results: list[tuple[db.SchemaState, db.SchemaState]] = []
    errors: list[BaseException] = []

    def run(s: ResourceStore) -> None:
        start.wait()
        try:
            results.append(db.upgrade(s))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    try:
        assert errors == []
        assert sorted(before.kind for before, _ in results) == ["current"] * 3 + ["empty"]
        assert all(after.at_head for _, after in results)
    finally:
        for s in stores:
            s.close()


def test_a_new_sqlite_file_being_written_is_waited_for(tmp_path: Path) -> None:
    """Switching a new file to WAL ignores busy_timeout: a second process opening it while the
    first migrates must wait, not fail with 'database is locked' (gunicorn workers, one volume)."""
    path = tmp_path / "fresh.db"
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("CREATE TABLE other (x)")
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO other VALUES (1)")
    release = threading.Timer(0.3, writer.execute, args=("COMMIT",))
    release.start()
    store = ResourceStore.from_url(f"sqlite:///{path}")
    try:
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        release.join()
        writer.close()
        store.close()


# ------------------------------------------------------------- databases made by create_all


def _legacy(store: ResourceStore) -> None:
    """What fhirbridge did before migrations: create_all of its metadata then, some data."""
    pre_migration_schema.metadata.create_all(store.engine)
    with store.engine.begin() as conn:
        conn.execute(
            submissions.insert().values(
                id="s1",
                source="clinic-a",
                patient_id="p1",
                content_hash="h",
                received_at=datetime(2026, 1, 1, tzinfo=UTC),
                summary="{}",
            )
        )


def test_pre_migration_database_is_adopted_with_its_data(store: ResourceStore) -> None:
    _legacy(store)
    assert db.state(store).kind == "unversioned"
    with pytest.raises(db.SchemaNotCurrentError, match="fhirbridge db upgrade"):
        db.ensure_current(store, auto_upgrade=False)
    before, after = db.upgrade(store)
    assert before.kind == "unversioned"
    assert after.at_head
    assert _diff(store) == []
    with store.engine.connect() as conn:
        assert conn.execute(submissions.select()).one().id == "s1"


def test_pre_migration_database_is_the_baseline_revision(store: ResourceStore) -> None:
    """What create_all made before migrations is exactly what revision 0001 makes, which is what
    adoption compares with (index predicates included)."""
    _legacy(store)
    with store.engine.connect() as conn:
        assert db.schema_shape(conn, OURS) == db._baseline_shape()


def test_database_made_by_todays_create_all_is_not_adopted(store: ResourceStore) -> None:
    """Adoption is for databases made before migrations, whose schema is the baseline's: tables
    made since by create_all of today's schema.py (never done by fhirbridge) are left alone."""
    metadata.create_all(store.engine)
    with pytest.raises(db.SchemaNotCurrentError, match="indexes differ"):
        db.upgrade(store)
    assert "alembic_version" not in _tables(store)


def test_pre_migration_database_that_differs_is_not_touched(store: ResourceStore) -> None:
    _legacy(store)
    with store.engine.begin() as conn:
        conn.execute(text("DROP TABLE sync_delivery"))
        conn.execute(text("DROP INDEX ix_submission_patient_id"))
        # same name and columns, but partial: not the baseline's index either
        conn.execute(text("DROP INDEX ix_fhir_search_index_ref_resource_type_param"))
        conn.execute(
            text(
                "CREATE INDEX ix_fhir_search_index_ref_resource_type_param "
                "ON fhir_search_index (ref, resource_type, param) WHERE ref IS NOT NULL"
            )
        )
    with pytest.raises(db.SchemaNotCurrentError) as caught:
        db.upgrade(store)
    message = str(caught.value)
    assert "table sync_delivery is missing" in message
    assert "submission: indexes differ" in message
    assert "fhir_search_index: indexes differ" in message
    assert "alembic_version" not in _tables(store)
    assert db.state(store).kind == "unversioned"


def test_unknown_revision_is_refused_even_with_auto_upgrade(store: ResourceStore) -> None:
    db.upgrade(store)
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    assert db.state(store).kind == "unknown"
    with pytest.raises(db.SchemaNotCurrentError, match="9999, which this version"):
        db.ensure_current(store, auto_upgrade=True)
    with pytest.raises(db.SchemaNotCurrentError):
        db.upgrade(store)


# ------------------------------------------------------ 0002: the claim's indexes, and back

NEW_CLAIM_INDEXES = {
    "ix_sync_delivery_target_next_attempt_at",
    "ix_sync_delivery_target_patient_ref_resource_type_resource_id",
}
OLD_CLAIM_INDEX = "ix_sync_delivery_target_patient_ref"


def _delivery_indexes(store: ResourceStore) -> set[str]:
    return {str(i["name"]) for i in inspect(store.engine).get_indexes("sync_delivery")}


def _ledger(store: ResourceStore) -> list[tuple[Any, ...]]:
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(delivery).order_by(delivery.c.target, delivery.c.resource_id)
        ).all()
        return [tuple(r) for r in rows] + [tuple(conn.execute(submissions.select()).one())]


def test_claim_indexes_up_from_the_baseline_and_down_again_keep_the_data(
    store: ResourceStore,
) -> None:
    with store.write() as conn:
        command.upgrade(db.alembic_config(conn), db.BASELINE)
    assert db.state(store).kind == "behind"
    now, later = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC)
    with store.write() as conn:  # queued as the service at 0001 queued them
        conn.execute(
            submissions.insert().values(
                id="s1",
                source="clinic-a",
                patient_id="p1",
                content_hash="h",
                received_at=now,
                summary="{}",
            )
        )
        outbox = Outbox(store, [Route("ehr"), Route("lab", frozenset({"Observation"}))])
        for patient, resources, at in (("p1", ["o1", "o2"], now), ("p2", ["o3"], later)):
            changed = [("Patient", patient, 1)] + [("Observation", r, 1) for r in resources]
            outbox.enqueue_versions(conn, changed, patient_ref=f"Patient/{patient}", now=at)
    data = _ledger(store)
    assert len(data) == 5 + 3 + 1
    assert OLD_CLAIM_INDEX in _delivery_indexes(store)

    before, after = db.upgrade(store)
    assert (before.current, after.current, after.kind) == (db.BASELINE, SHIPPED, "current")
    assert _diff(store) == []
    assert _delivery_indexes(store) >= NEW_CLAIM_INDEXES
    assert OLD_CLAIM_INDEX not in _delivery_indexes(store)
    assert _ledger(store) == data

    db.downgrade(store, db.BASELINE)
    assert db.state(store).current == db.BASELINE
    with store.engine.connect() as conn:
        assert db.schema_shape(conn, OURS) == db._baseline_shape()
    assert _ledger(store) == data

    db.upgrade(store)
    assert _diff(store) == []
    assert _ledger(store) == data
    claimed = outbox.claim("ehr", owner="w", now=now)  # p1's rows: p2's are not due yet
    assert {(d.patient_ref, d.status) for d in claimed} == {("Patient/p1", "in_flight")}
    assert len(claimed) == 3


def test_claim_reads_through_the_claim_indexes_on_sqlite(tmp_path: Path) -> None:
    """Both reads of Outbox.claim, as it runs them, are index range scans in the order asked
    for (no sort) on a database that was never ANALYZEd: without them a claim read every row of
    its target (~430 ms at 96k rows queued). The plans of the real statements, captured."""
    store = ResourceStore.from_url(f"sqlite:///{tmp_path / 'claim.db'}")
    db.upgrade(store)
    outbox = Outbox(store, [Route("ehr")])
    now = datetime(2026, 1, 1, tzinfo=UTC)
    with store.write() as conn:
        for patient, at in (("p1", now), ("p2", now.replace(second=1))):
            changed = [("Patient", patient, 1), ("Observation", f"o-{patient}", 1)]
            outbox.enqueue_versions(conn, changed, patient_ref=f"Patient/{patient}", now=at)
    reads: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            reads.append((statement, params))

    event.listen(store.engine, "before_cursor_execute", capture)
    try:
        claimed = outbox.claim("ehr", owner="w", now=now.replace(second=2))
    finally:
        event.remove(store.engine, "before_cursor_execute", capture)
    assert sorted(d.resource_id for d in claimed) == ["o-p1", "p1"]
    with store.engine.connect() as conn:
        plans = [
            " | ".join(row[3] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params))
            for sql, params in reads
        ]
    store.close()
    assert len(plans) == 2, plans
    oldest_due, patients_rows = plans
    assert "USING INDEX ix_sync_delivery_target_next_attempt_at (target=?)" in oldest_due
    assert (
        "USING INDEX ix_sync_delivery_target_patient_ref_resource_type_resource_id "
        "(target=? AND patient_ref=?)" in patients_rows
    )
    assert "TEMP B-TREE" not in oldest_due + patients_rows


# ------------------------------------------- behind head: one more revision than shipped, in tmp


PROBE = '''"""A revision after the shipped ones, for the test."""
import sqlalchemy as sa
from alembic import op

revision = {rev}
down_revision = {down}
branch_labels = {labels}
depends_on = None


def upgrade() -> None:
    op.create_table("probe", sa.Column("id", sa.Integer(), primary_key=True))


def downgrade() -> None:
    op.drop_table("probe")
'''


def _revision(rev: str, down: str, labels: str = "None") -> str:
    """A revision file; the arguments are Python source (quoted ids, a tuple for a merge)."""
    return PROBE.format(rev=rev, down=down, labels=labels)


@pytest.fixture
def one_more_revision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This version's migrations plus the next revision, as if fhirbridge had been upgraded."""
    location = tmp_path / "migrations"
    shutil.copytree(db.MIGRATIONS_DIR, location, ignore=shutil.ignore_patterns("__pycache__"))
    (location / "versions" / f"{NEXT}_probe.py").write_text(_revision(f'"{NEXT}"', f'"{SHIPPED}"'))
    monkeypatch.setattr(db, "MIGRATIONS_DIR", location)
    return location


def test_behind_head_refuses_then_auto_upgrades(
    one_more_revision: Path, store: ResourceStore
) -> None:
    with store.write() as conn:
        command.upgrade(db.alembic_config(conn), SHIPPED)
    now = db.state(store)
    assert (now.kind, now.current, now.head) == ("behind", SHIPPED, NEXT)
    with pytest.raises(db.SchemaNotCurrentError) as caught:
        db.ensure_current(store, auto_upgrade=False)
    assert str(caught.value) == (
        f"the database is at revision {SHIPPED}, this version of fhirbridge needs {NEXT}: run "
        "`fhirbridge db upgrade` (or set FHIRBRIDGE_DB_AUTO_UPGRADE=true)"
    )
    assert db.ensure_current(store, auto_upgrade=True).current == NEXT
    assert "probe" in _tables(store)


def test_new_revision_writes_what_schema_py_adds(tmp_path: Path) -> None:
    location = tmp_path / "migrations"
    shutil.copytree(db.MIGRATIONS_DIR, location, ignore=shutil.ignore_patterns("__pycache__"))
    assert db.new_revision("nothing", script_location=location) is None
    probe = Table("probe_extra", metadata, Column("id", Integer, primary_key=True))
    try:
        path = db.new_revision("add probe extra", script_location=location)
        assert path is not None and path.name == f"{NEXT}_add_probe_extra.py"
        assert "op.create_table('probe_extra'" in path.read_text()
        engine = create_engine("sqlite://")
        with engine.begin() as conn:
            command.upgrade(db.alembic_config(conn, script_location=location), "head")
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, metadata) == []
        engine.dispose()
    finally:
        metadata.remove(probe)


# ------------------------------------------- the head, read from the version files, not alembic


def _alembic_heads(location: Path) -> tuple[str, ...]:
    script = ScriptDirectory.from_config(db.alembic_config(script_location=location))
    return tuple(sorted(script.get_heads()))


def test_declared_head_is_alembics_head(one_more_revision: Path) -> None:
    shipped = ROOT / "fhirbridge" / "migrations"
    assert db.declared_heads(shipped) == _alembic_heads(shipped) == (SHIPPED,)
    assert db.declared_heads(one_more_revision) == _alembic_heads(one_more_revision) == (NEXT,)
    assert db.head() == NEXT


def test_declared_heads_of_branches_and_merges_are_alembics(one_more_revision: Path) -> None:
    versions = one_more_revision / "versions"
    branch, merge = AFTER_NEXT, THIRD_AFTER
    (versions / f"{branch}_branch.py").write_text(_revision(f'"{branch}"', f'"{SHIPPED}"'))
    heads = (NEXT, branch)
    assert db.declared_heads(one_more_revision) == _alembic_heads(one_more_revision) == heads
    with pytest.raises(RuntimeError, match="exactly one head"):
        db.head()
    db.declared_heads.cache_clear()
    (versions / f"{merge}_merge.py").write_text(_revision(f'"{merge}"', repr(heads)))
    assert db.declared_heads(one_more_revision) == _alembic_heads(one_more_revision) == (merge,)


@pytest.mark.parametrize(
    ("rev", "labels"),
    [(f'"{AFTER_NEXT[:3]}" + "{AFTER_NEXT[3:]}"', "None"), (f'"{AFTER_NEXT}"', "('side',)")],
    ids=["computed-id", "branch-label"],
)
def test_alembic_decides_what_the_files_do_not_declare_plainly(
    one_more_revision: Path, rev: str, labels: str
) -> None:
    odd = one_more_revision / "versions" / f"{AFTER_NEXT}_odd.py"
    odd.write_text(_revision(rev, f'"{NEXT}"', labels))
    assert db.declared_heads(one_more_revision) is None
    assert db.head() == AFTER_NEXT == _alembic_heads(one_more_revision)[0]


def test_starting_on_a_database_at_head_does_not_import_alembic(tmp_path: Path) -> None:
    database_url = f"sqlite:///{tmp_path / 'app.db'}"
    store = ResourceStore.from_url(database_url)
    db.upgrade(store)
    store.close()
    code = (
        "import sys\n"
        "from fhirbridge import create_app\n"
        "client = create_app().test_client()\n"
        "assert client.get('/readyz').json['checks']['migrations'] is True\n"
        "print(sorted(m for m in sys.modules if m.partition('.')[0] == 'alembic'))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRBRIDGE_")}
    env |= {
        "FHIRBRIDGE_DATABASE_URL": database_url,
        "FHIRBRIDGE_MAPPINGS_DIR": str(ROOT / "mappings"),
    }
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert (run.returncode, run.stdout) == (0, "[]\n"), run.stderr[-2000:]


# ------------------------------------------------------------------ the app and the command


def _settings(database_url: str, **kw: Any) -> Settings:
    return Settings(database_url=database_url, mappings_dir=ROOT / "mappings", **kw)


def test_app_refuses_a_database_behind_head_unless_auto_upgrade(tmp_path: Path) -> None:
    database_url = f"sqlite:///{tmp_path / 'app.db'}"
    with pytest.raises(db.SchemaNotCurrentError, match="no fhirbridge tables yet"):
        create_app(_settings(database_url))
    app = create_app(_settings(database_url, db_auto_upgrade=True))
    app.extensions["fhirbridge"].store.close()
    app = create_app(_settings(database_url))  # at head now: starts without upgrading
    app.extensions["fhirbridge"].store.close()


def test_in_memory_app_is_migrated_on_its_own_connection() -> None:
    app = create_app(_settings("sqlite://", db_auto_upgrade=True))
    store = app.extensions["fhirbridge"].store
    assert db.state(store).at_head
    with app.test_client() as client:
        fixture = ROOT / "mappings/fixtures/medicine-session.in.json"
        resp = client.post(
            "/api/v1/submissions", data=fixture.read_bytes(), content_type="application/json"
        )
        assert resp.status_code == 201, resp.get_data(as_text=True)
    store.close()


def test_readyz_is_503_when_the_database_falls_behind(tmp_path: Path) -> None:
    app = create_app(_settings(f"sqlite:///{tmp_path / 'ready.db'}", db_auto_upgrade=True))
    store = app.extensions["fhirbridge"].store
    with app.test_client() as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json is not None and ready.json["checks"]["migrations"] is True
        db.downgrade(store, "base")  # as if another instance had rolled the schema back
        behind = client.get("/readyz")
    store.close()
    assert behind.status_code == 503
    assert behind.json == {
        "status": "not ready",
        "checks": {"database": True, "mappings": True, "migrations": False},
    }


def _cli(database_url: str, *args: str, **env: str) -> Any:
    return CliRunner().invoke(
        main, list(args), env={"FHIRBRIDGE_DATABASE_URL": database_url, **env}
    )


def test_db_commands(url: str) -> None:
    check = _cli(url, "db", "check")
    assert check.exit_code == 1
    assert "no fhirbridge tables yet" in check.stderr
    current = _cli(url, "db", "current")
    assert (current.exit_code, current.stdout) == (0, "none\n")

    upgraded = _cli(url, "db", "upgrade")
    assert upgraded.exit_code == 0, upgraded.output
    assert upgraded.stdout == f"upgraded from empty to {db.head()} (head)\n"
    again = _cli(url, "db", "upgrade")
    assert (again.exit_code, again.stdout) == (0, "")
    assert "already at" in again.stderr

    current = _cli(url, "db", "current")
    assert (current.exit_code, current.stdout) == (0, f"{db.head()}\n")
    assert _cli(url, "db", "check").exit_code == 0


def test_db_upgrade_adopts_a_pre_migration_database(store: ResourceStore, url: str) -> None:
    _legacy(store)
    assert _cli(url, "db", "check").exit_code == 1
    result = _cli(url, "db", "upgrade")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"adopted the pre-migration database; upgraded to {db.head()} (head)\n"
    assert db.state(store).at_head


def test_db_command_on_an_unreachable_database_shows_no_url() -> None:
    url = "postgresql+psycopg://someone:pa55word@127.0.0.1:9/nowhere?connect_timeout=2"
    result = _cli(url, "db", "check")
    assert result.exit_code == 1
    assert result.stderr == "cannot use the database: OperationalError\n"


def test_serve_on_a_database_behind_head_exits_2(tmp_path: Path) -> None:
    result = _cli(f"sqlite:///{tmp_path / 'serve.db'}", "serve", "--port", "9")
    assert result.exit_code == 2
    assert "run `fhirbridge db upgrade`" in result.stderr


def test_worker_checks_the_database_too(tmp_path: Path) -> None:
    targets = tmp_path / "targets.yaml"
    targets.write_text(
        "targets:\n  - name: research\n    base_url: http://127.0.0.1:9/fhir\n"
        "    profile: generic-r4\n"
    )
    database_url = f"sqlite:///{tmp_path / 'worker.db'}"
    refused = _cli(database_url, "worker", "--once", FHIRBRIDGE_TARGETS=str(targets))
    assert refused.exit_code == 2
    assert "no fhirbridge tables yet" in refused.stderr
    ran = _cli(
        database_url,
        "worker",
        "--once",
        FHIRBRIDGE_TARGETS=str(targets),
        FHIRBRIDGE_DB_AUTO_UPGRADE="true",
    )
    assert ran.exit_code == 0, ran.output
    assert "0 deliveries handled" in ran.stderr
