"""The database schema at run time: where it stands against this code, and bringing it to head.

Alembic is configured in code (no alembic.ini): its script directory is the installed
fhirbridge.migrations package, so migrations run the same from a checkout, a wheel or the
container. Every migration runs on a connection of the caller's ResourceStore — for an
in-memory sqlite:// store that is its one StaticPool connection, so the tables land in the
database the app uses — inside one transaction that holds the database's write lock (SQLite
BEGIN IMMEDIATE, a PostgreSQL advisory lock): instances started together migrate once.

The service refuses to start on a database that is not at head (`ensure_current`) unless
FHIRBRIDGE_DB_AUTO_UPGRADE is set. A database created before migrations existed (fhirbridge
tables, no alembic_version) is adopted by `upgrade`: when its tables, columns, keys, indexes
and unique constraints are exactly the baseline revision's, it is stamped at the baseline and
upgraded from there; otherwise nothing is touched and the error names what differs (table,
column and index names only). An index's predicate counts: a partial index is not the
baseline's whole-table one.

Alembic itself is imported only to migrate, or when a database is not at head: importing it
costs ~0.15-0.3 s of every start (issue 6), and a start on a database at head only needs the
head revision id, which `head()` reads from the version files' literals (alembic's
ScriptDirectory decides whenever a file is anything but a plain revision or merge).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import Connection, create_engine, inspect, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import StaticPool

from fhirbridge.store.schema import metadata

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory
    from sqlalchemy.engine.interfaces import ReflectedIndex

    from fhirbridge.store.resources import ResourceStore

__all__ = [
    "BASELINE",
    "SchemaNotCurrentError",
    "SchemaState",
    "at_head",
    "check_state",
    "downgrade",
    "ensure_current",
    "head",
    "new_revision",
    "normal_predicate",
    "schema_differences",
    "schema_shape",
    "state",
    "upgrade",
]

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
VERSION_TABLE = "alembic_version"  # Alembic's default, in the connection's default schema
BASELINE = "0001"  # the schema as metadata.create_all made it before migrations existed
# pg_advisory_xact_lock key: any constant no other application on the database uses.
_PG_LOCK_KEY = 0x6668_6972_6D69_67  # "fhirmig"
UPGRADE_HINT = "run `fhirbridge db upgrade` (or set FHIRBRIDGE_DB_AUTO_UPGRADE=true)"

Kind = Literal["current", "behind", "empty", "unversioned", "unknown"]


class SchemaNotCurrentError(Exception):
    """The database is not at this version's head revision, or cannot be brought there.

    The message says what to do and never holds the database URL or any data.
    """


@dataclass(frozen=True, slots=True)
class SchemaState:
    """Where a database stands: its revision (None: no alembic_version) and head's.

    kind: current (at head) | behind (an older known revision) | empty (no fhirbridge table)
    | unversioned (fhirbridge tables, no revision: made before migrations) | unknown (a
    revision this version does not have: written by a newer fhirbridge).
    """

    kind: Kind
    current: str | None
    head: str

    @property
    def at_head(self) -> bool:
        return self.kind == "current"

    def describe(self) -> str:
        """One line for people: what the database is, and what to do about it."""
        if self.kind == "current":
            return f"the database is at revision {self.head} (head)"
        if self.kind == "behind":
            return (
                f"the database is at revision {self.current}, this version of fhirbridge "
                f"needs {self.head}: {UPGRADE_HINT}"
            )
        if self.kind == "empty":
            return f"the database has no fhirbridge tables yet: {UPGRADE_HINT}"
        if self.kind == "unversioned":
            return (
                "the database has fhirbridge tables but no migration history (it was created "
                "before migrations existed): run `fhirbridge db upgrade`, which adopts it when "
                "its tables are the expected ones"
            )
        return (
            f"the database is at revision {self.current}, which this version of fhirbridge "
            f"does not know (written by a newer version?); its head is {self.head}"
        )


def alembic_config(
    connection: Connection | None = None, *, script_location: Path | None = None
) -> Config:
    """Alembic's configuration, in code: the script directory (default: this package's
    migrations) and the connection to use."""
    from alembic.config import Config

    location = script_location or MIGRATIONS_DIR
    config = Config()
    # ConfigParser interpolation: a literal '%' in the path must be doubled.
    config.set_main_option("script_location", str(location).replace("%", "%%"))
    config.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@cache
def _script(location: Path) -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config(script_location=location))


_DECLARED = frozenset({"revision", "down_revision", "branch_labels", "depends_on"})


@cache
def declared_heads(location: Path) -> tuple[str, ...] | None:
    """The head revision(s) of a script directory as its version files declare them, without
    importing alembic: each file's top-level `revision` and `down_revision` literals.

    None (let alembic decide) when a file is more than a plain revision or merge: a value that
    is not a literal, no `revision`, branch labels or dependencies. Files are chosen as
    alembic chooses them (``*.py`` in versions/, not ``__init__`` nor an editor's ``.#``).
    """
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in sorted((location / "versions").glob("*.py")):
        if path.name.startswith(("__init__", ".#")):
            continue
        values: dict[str, Any] = {}
        try:
            for node in ast.parse(path.read_bytes(), str(path)).body:
                if isinstance(node, ast.Assign) and len(node.targets) == 1:
                    target, value = node.targets[0], node.value
                elif isinstance(node, ast.AnnAssign) and node.value is not None:
                    target, value = node.target, node.value
                else:
                    continue
                if isinstance(target, ast.Name) and target.id in _DECLARED:
                    values[target.id] = ast.literal_eval(value)
        except (SyntaxError, ValueError, TypeError):
            return None
        revision, down = values.get("revision"), values.get("down_revision")
        if not isinstance(revision, str) or values.get("branch_labels") or values.get("depends_on"):
            return None
        if isinstance(down, str):
            parents.add(down)
        elif isinstance(down, tuple) and all(isinstance(d, str) for d in down):
            parents.update(down)  # a merge revision
        elif down is not None:
            return None
        revisions.add(revision)
    return tuple(sorted(revisions - parents))


def head() -> str:
    """The latest revision this version of fhirbridge ships."""
    heads = declared_heads(MIGRATIONS_DIR)
    if heads is None:
        heads = tuple(_script(MIGRATIONS_DIR).get_heads())
    if len(heads) != 1:
        raise RuntimeError(f"migrations must have exactly one head, found {sorted(heads)}")
    return heads[0]


def check_state(connection: Connection) -> SchemaState:
    """Where the database behind `connection` stands (reads only)."""
    # Read alembic_version directly: MigrationContext would log two lines per readiness probe.
    insp = inspect(connection)
    latest = head()
    current = None
    if insp.has_table(VERSION_TABLE):  # empty after a downgrade to base
        rows = connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars()
        current = ",".join(sorted(rows)) or None  # several rows: branches, never shipped
    if current is None:
        ours = set(metadata.tables) & set(insp.get_table_names())
        return SchemaState("unversioned" if ours else "empty", None, latest)
    if current == latest:
        return SchemaState("current", current, latest)
    known = {rev.revision for rev in _script(MIGRATIONS_DIR).walk_revisions()}
    return SchemaState("behind" if current in known else "unknown", current, latest)


def state(store: ResourceStore) -> SchemaState:
    """Where the store's database stands (raises SQLAlchemyError when it does not answer)."""
    with store.engine.connect() as conn:
        return check_state(conn)


def at_head(store: ResourceStore) -> bool:
    """True when the database answers and is at head (readiness; errors count as False)."""
    try:
        return state(store).at_head
    except SQLAlchemyError:
        return False


def upgrade(store: ResourceStore) -> tuple[SchemaState, SchemaState]:
    """Bring the database to head, adopting a pre-migration database; (before, after).

    One transaction under the database's write lock: a concurrent upgrade waits, then finds
    nothing to do. Raises SchemaNotCurrentError for an unknown revision or a pre-migration
    database whose tables are not the baseline's (nothing is changed then).
    """
    from alembic import command

    with store.write() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
        before = check_state(conn)
        if before.kind == "unknown":
            raise SchemaNotCurrentError(before.describe())
        if before.kind == "unversioned":
            problems = schema_differences(conn, _baseline_shape())
            if problems:
                raise SchemaNotCurrentError(
                    "the database has fhirbridge tables but no migration history, and they are "
                    "not the baseline schema, so it was not changed: " + "; ".join(problems)
                )
            command.stamp(alembic_config(conn), BASELINE)
        if before.kind != "current":
            command.upgrade(alembic_config(conn), "head")
        after = check_state(conn)
    return before, after


def downgrade(store: ResourceStore, revision: str = "base") -> None:
    """Migrate down to `revision` ("base": drop every fhirbridge table). Tests and rollbacks."""
    from alembic import command

    with store.write() as conn:
        command.downgrade(alembic_config(conn), revision)


def ensure_current(store: ResourceStore, *, auto_upgrade: bool) -> SchemaState:
    """Return the state when the database is at head; upgrade it first when `auto_upgrade`;
    otherwise raise SchemaNotCurrentError saying what to run."""
    now = state(store)
    if now.at_head:
        return now
    if auto_upgrade and now.kind != "unknown":
        return upgrade(store)[1]
    raise SchemaNotCurrentError(now.describe())


# ---------------------------------------------------------------- adopting a pre-migration db

Shape = dict[str, dict[str, Any]]


def normal_predicate(sql: str) -> str:
    """A partial index's WHERE in one form whoever wrote it: as schema.py declares it, as SQLite
    keeps it, and as PostgreSQL reflects it, which adds parentheses and casts and writes
    `status IN ('a', 'b')` as `(status)::text = ANY (ARRAY['a'::character varying, …]::text[])`.
    Parentheses, case and spacing do not count."""
    out = re.sub(r"::(character varying|[a-z]+)(\[\])?", "", sql)
    out = " ".join(out.replace("(", " ").replace(")", " ").lower().split())
    return out.replace("= any array[", "in ").replace("]", "")


def _predicate(index: ReflectedIndex) -> str:
    """A reflected index's WHERE (`normal_predicate`); "" for a whole-table index."""
    for key, value in (index.get("dialect_options") or {}).items():
        if key.endswith("_where") and value is not None:
            return normal_predicate(str(value))
    return ""


def _table_shape(conn: Connection, table: str) -> dict[str, Any]:
    insp = inspect(conn)
    return {
        "columns": sorted((c["name"], bool(c["nullable"])) for c in insp.get_columns(table)),
        "primary key": sorted(insp.get_pk_constraint(table)["constrained_columns"]),
        "indexes": sorted(
            (
                str(i["name"]),
                tuple(map(str, i["column_names"])),
                bool(i["unique"]),
                _predicate(i),
            )
            for i in insp.get_indexes(table)
            if not i.get("duplicates_constraint")
        ),
        "unique constraints": sorted(
            tuple(map(str, u["column_names"])) for u in insp.get_unique_constraints(table)
        ),
        "foreign keys": sorted(
            (tuple(f["constrained_columns"]), f["referred_table"], tuple(f["referred_columns"]))
            for f in insp.get_foreign_keys(table)
        ),
    }


def schema_shape(conn: Connection, tables: set[str]) -> Shape:
    """Names, nullability, keys, indexes (predicates included) and unique constraints of those
    of `tables` that exist: what two backends agree on, types aside."""
    present = set(inspect(conn).get_table_names()) & tables
    return {table: _table_shape(conn, table) for table in sorted(present)}


def schema_differences(conn: Connection, expected: Shape) -> list[str]:
    """What differs between the database and `expected`, by name only (never data)."""
    actual = schema_shape(conn, set(expected))
    problems: list[str] = []
    for table, want in expected.items():
        have = actual.get(table)
        if have is None:
            problems.append(f"table {table} is missing")
            continue
        problems.extend(f"{table}: {part} differ" for part in want if have[part] != want[part])
    return problems


@cache
def _baseline_shape() -> Shape:
    """The baseline revision's tables, from a scratch in-memory SQLite migrated to it."""
    from alembic import command

    engine = create_engine("sqlite://", poolclass=StaticPool)
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), BASELINE)
            return schema_shape(conn, set(inspect(conn).get_table_names()) - {"alembic_version"})
    finally:
        engine.dispose()


# ---------------------------------------------------------------- developers: new revisions


def new_revision(message: str, *, script_location: Path | None = None) -> Path | None:
    """Write the next revision (0002, 0003, …) from what schema.py adds to head; its path,
    or None when schema.py and head agree (no file is written then)."""
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    directory = ScriptDirectory.from_config(alembic_config(script_location=script_location))
    numbers = [int(r.revision) for r in directory.walk_revisions() if r.revision.isdigit()]
    rev_id = f"{max(numbers, default=0) + 1:04d}"
    engine = create_engine("sqlite://", poolclass=StaticPool)
    try:
        with engine.begin() as conn:
            config = alembic_config(conn, script_location=script_location)
            command.upgrade(config, "head")
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            if not compare_metadata(context, metadata):
                return None
            script = command.revision(config, message, autogenerate=True, rev_id=rev_id)
    finally:
        engine.dispose()
    assert script is not None and not isinstance(script, list)
    return Path(script.path)
