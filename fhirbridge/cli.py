"""The `fhirbridge` console script: serve, worker, map, validate, mappings, sync, db, config."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import orjson

from fhirbridge.errors import FhirbridgeError, MappingConfigError
from fhirbridge.settings import Settings

log = logging.getLogger("fhirbridge.cli")


def _emit(obj: Any) -> None:
    sys.stdout.buffer.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2) + b"\n")
    sys.stdout.flush()


def _load_pack(directory: Path | None) -> Any:
    from fhirbridge.mapping.pack import load_pack

    try:
        return load_pack(directory or Settings().mappings_dir)
    except MappingConfigError as exc:
        click.echo(str(exc), err=True)
        raise SystemExit(2) from None


@click.group()
@click.version_option(package_name="fhirbridge")
def main() -> None:
    """fhirbridge: MDMA-assisted psychotherapy records in, validated FHIR R4 out."""
    _configure_logging()


def _configure_logging() -> None:
    """Every command logs through fhirbridge.logs: FHIRBRIDGE_LOG_LEVEL, FHIRBRIDGE_LOG_FORMAT."""
    from fhirbridge import logs

    try:
        settings = Settings()
    except ValueError:  # pydantic's ValidationError: the command reports it when it reads them
        logs.configure()
        return
    try:
        logs.configure(settings.log_level, settings.log_format)
    except ValueError as exc:  # an unknown FHIRBRIDGE_LOG_LEVEL
        click.echo(f"FHIRBRIDGE_LOG_LEVEL: {exc}", err=True)
        raise SystemExit(2) from None


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8080, show_default=True, type=int)
@click.option("--workers", default=2, show_default=True, type=int, help="gunicorn workers.")
@click.option(
    "--worker/--no-worker",
    "with_worker",
    default=True,
    show_default=True,
    help="Also run a sync worker process when FHIRBRIDGE_TARGETS is set.",
)
def serve(host: str, port: int, workers: int, with_worker: bool) -> None:
    """Serve the HTTP API with gunicorn (database: FHIRBRIDGE_DATABASE_URL, default SQLite)."""
    from fhirbridge.gunicorn_conf import WorkerHooks, start_up_objects_frozen

    with start_up_objects_frozen():
        from gunicorn.app.base import BaseApplication

        from fhirbridge import create_app, logs, metrics
        from fhirbridge.auth import AuthConfigError
        from fhirbridge.db import SchemaNotCurrentError

        settings = Settings()
        _check_bind(host, port, settings)
        metrics_dir = None
        if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # Several gunicorn workers: /metrics must add up every worker's counters, which
            # prometheus_client does through files in a shared directory (the container sets
            # one).
            metrics_dir = tempfile.TemporaryDirectory(prefix="fhirbridge-metrics-")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir.name
        try:
            app = create_app(settings)
        except (MappingConfigError, SchemaNotCurrentError, AuthConfigError) as exc:
            _drop_metrics_dir(metrics_dir)
            click.echo(str(exc), err=True)
            raise SystemExit(2) from None

    class _Server(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            self.cfg.set("bind", f"{host}:{port}")
            self.cfg.set("workers", workers)
            self.cfg.set("accesslog", None)  # fhirbridge.access logs each request instead
            # gunicorn's own error log as JSON lines through the root handler (fhirbridge.logs)
            self.cfg.set("logger_class", logs.GunicornLogger)
            self.cfg.set("loglevel", settings.log_level.lower())
            self.cfg.set("child_exit", metrics.child_exit)
            # The app was built here, in the master: the workers fork from it (gunicorn's
            # preload; fhirbridge.gunicorn_conf does the same for the container).
            hooks = WorkerHooks(app)
            self.cfg.set("post_worker_init", hooks.post_worker_init)
            self.cfg.set("pre_request", hooks.pre_request)
            self.cfg.set("post_request", hooks.post_request)

        def load(self) -> Any:
            return app

    log.info("fhirbridge serving on http://%s:%d (FHIR API at /fhir)", host, port)
    sync = None
    if settings.targets and with_worker:
        # The embedded default runs one sync worker beside the server: its own process, so it
        # neither shares connections across gunicorn's fork nor stops when a web worker does.
        sync = subprocess.Popen([sys.executable, "-m", "fhirbridge.cli", "worker"])
        log.info("sync worker started (pid %d)", sync.pid)
    try:
        _Server().run()
    finally:
        if sync is not None:
            sync.terminate()
            sync.wait(timeout=30)
        _drop_metrics_dir(metrics_dir)


def _drop_metrics_dir(metrics_dir: tempfile.TemporaryDirectory[str] | None) -> None:
    """Undo serve's temporary PROMETHEUS_MULTIPROC_DIR (the environment outlives serve in tests)."""
    if metrics_dir is not None:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        metrics_dir.cleanup()


def _check_bind(host: str, port: int, settings: Settings) -> None:
    """Authentication may be off only on loopback: exit 2 otherwise, warn loudly if it is off."""
    from fhirbridge.auth import BindRefused, auth_configured, check_bind

    bind = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    try:
        warning = check_bind([bind], auth_configured(settings))
    except BindRefused as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None
    if warning:
        click.echo(warning, err=True)
        log.warning("authentication is off: every caller gets every scope (loopback %s)", bind)


@main.group()
def auth() -> None:
    """Inbound API keys: make a key, or hash one you have, for FHIRBRIDGE_AUTH_API_KEYS."""


def _key_options(command: Any) -> Any:
    from fhirbridge.api.access import SCOPES

    command = click.option(
        "--scope",
        "scopes",
        multiple=True,
        required=True,
        type=click.Choice(SCOPES),
        help="A scope the key grants (repeat for several).",
    )(command)
    return click.option(
        "--client-id",
        required=True,
        help="Who holds the key (logged and audited; A-Z a-z 0-9 . _ -).",
    )(command)


def _key_entry(key: str, client_id: str, scopes: tuple[str, ...]) -> dict[str, Any]:
    from fhirbridge.auth.apikeys import entry

    try:
        return entry(key, client_id, scopes)
    except ValueError:
        click.echo(
            "error: not a key (fbk_...) or --client-id is not 1-64 of A-Z a-z 0-9 . _ -", err=True
        )
        raise SystemExit(2) from None


@auth.command("new-key")
@_key_options
def auth_new_key(client_id: str, scopes: tuple[str, ...]) -> None:
    """Print a new API key (once: only its hash is kept) and its FHIRBRIDGE_AUTH_API_KEYS entry.

    stdout: line 1 the key, line 2 the JSON entry. Add the entry to the JSON array in
    FHIRBRIDGE_AUTH_API_KEYS (several entries per client are fine: rotation).
    """
    from fhirbridge.auth.apikeys import new_key

    key = new_key()
    item = _key_entry(key, client_id, scopes)
    click.echo(f"API key for {client_id} (shown once, store it now), then its entry:", err=True)
    click.echo(key)
    click.echo(orjson.dumps(item).decode())


@auth.command("hash-key")
@_key_options
def auth_hash_key(client_id: str, scopes: tuple[str, ...]) -> None:
    """Read an API key from stdin and print its FHIRBRIDGE_AUTH_API_KEYS entry."""
    key = sys.stdin.read().strip()
    click.echo(orjson.dumps(_key_entry(key, client_id, scopes)).decode())


@main.command()
@click.option("--once", is_flag=True, help="One pass over every target, then exit.")
@click.option(
    "--concurrency",
    type=click.IntRange(1, 16),
    default=None,
    help="Deliveries in flight at once (default: FHIRBRIDGE_WORKER_CONCURRENCY, 1).",
)
def worker(once: bool, concurrency: int | None) -> None:
    """Deliver queued resources to the targets in FHIRBRIDGE_TARGETS until stopped (SIGTERM)."""
    from fhirbridge.store.resources import ResourceStore
    from fhirbridge.sync.outbox import Outbox
    from fhirbridge.sync.runtime import build_runtimes, routes
    from fhirbridge.sync.targets import TargetConfigError, load_targets
    from fhirbridge.sync.worker import Worker, default_owner

    settings = Settings()
    if not settings.targets:
        click.echo("no targets: set FHIRBRIDGE_TARGETS to a targets YAML file", err=True)
        raise SystemExit(2)
    try:
        targets = load_targets(settings.targets)
    except TargetConfigError as exc:
        click.echo(str(exc), err=True)
        raise SystemExit(2) from None
    store = ResourceStore.from_url(settings.database_url)
    _check_schema(store, settings)
    outbox = Outbox(store, routes(targets))
    # One Worker per slot, each with its own owner id (its claims and leases) and its own
    # HTTP clients: exactly what several worker processes would be, sharing one pool.
    runners = [
        Worker(
            store,
            outbox,
            build_runtimes(targets),
            owner=f"{default_owner()}:{slot}",
            lease=timedelta(seconds=settings.worker_lease_seconds),
        )
        for slot in range(1 if once else concurrency or settings.worker_concurrency)
    ]
    if once:
        handled = runners[0].run_once()
        log.info("%d deliveries handled", handled)
        return
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    log.info("sync worker: %d target(s), %d in flight at most", len(targets), len(runners))
    threads = [
        threading.Thread(
            target=runner.run,
            args=(stop,),
            kwargs={"idle_seconds": settings.worker_idle_seconds},
            name=f"sync-{slot}",
        )
        for slot, runner in enumerate(runners)
    ]
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        for thread in threads:
            thread.join(timeout=0.5)  # the main thread stays free to take SIGTERM
    store.close()


def _check_schema(store: Any, settings: Settings) -> None:
    """Exit 2 (saying what to run) unless the store's database is at the latest migration;
    under FHIRBRIDGE_DB_AUTO_UPGRADE it is upgraded first. Unreachable: exit 1."""
    from sqlalchemy.exc import SQLAlchemyError

    from fhirbridge.db import SchemaNotCurrentError, ensure_current

    try:
        ensure_current(store, auto_upgrade=settings.db_auto_upgrade)
    except SchemaNotCurrentError as exc:
        store.close()
        click.echo(str(exc), err=True)
        raise SystemExit(2) from None
    except SQLAlchemyError as exc:
        store.close()
        click.echo(f"cannot read the database: {type(exc).__name__}", err=True)
        raise SystemExit(1) from None


@main.command("map")
@click.argument("file", type=click.File("rb"))
@click.option("--trace", is_flag=True, help="Also print, for every element, the rule that made it.")
@click.option(
    "--ndjson",
    "ndjson_in",
    is_flag=True,
    help="FILE holds one submission per line (implied by .ndjson / .jsonl).",
)
@click.option(
    "--output",
    "output",
    type=click.Choice(["bundle", "ndjson"]),
    help="Output: one transaction Bundle, or one resource per line "
    "(default: ndjson for NDJSON input, bundle otherwise).",
)
@click.option(
    "--mappings",
    "mappings_dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Mapping pack folder (default: FHIRBRIDGE_MAPPINGS_DIR or the shipped pack).",
)
def map_command(
    file: Any, trace: bool, ndjson_in: bool, output: str | None, mappings_dir: Path | None
) -> None:
    """Map submissions in FILE (- for stdin) to FHIR R4 on stdout.

    One JSON submission gives a transaction Bundle. NDJSON (one submission per line) is
    streamed with bounded memory; a bad line is reported on stderr with its line number and
    the others are still mapped (exit status 1 if any line failed).
    """
    name = getattr(file, "name", "-")
    pack = _load_pack(mappings_dir)
    if ndjson_in or str(name).endswith((".ndjson", ".jsonl")):
        if trace:
            raise click.UsageError("--trace maps one submission at a time: give a JSON file")
        _map_ndjson(file, name, pack, output or "ndjson")
        return
    _map_one(file, name, pack, output or "bundle", trace)


def _read_and_transform(file: Any, name: str, pack: Any, *, trace: bool = False) -> Any:
    """One submission file → its MapResult; problems on stderr (paths only) and exit 1."""
    from fhirbridge.fhir.validate import OutputValidator
    from fhirbridge.pipeline import transform
    from fhirbridge.validation import SubmissionValidator

    try:
        document = orjson.loads(file.read())
    except orjson.JSONDecodeError as exc:
        click.echo(f"{name}: malformed JSON at line {exc.lineno}, column {exc.colno}", err=True)
        raise SystemExit(1) from None
    try:
        return transform(
            document,
            pack=pack,
            input_validator=SubmissionValidator(pack.source_schema, pack.integrity),
            output_validator=OutputValidator(),
            now=datetime.now(UTC),
            trace=trace,
        )
    except FhirbridgeError as exc:
        for issue in exc.issues:
            click.echo(f"{', '.join(issue.expression) or '-'}: {issue.diagnostics}", err=True)
        raise SystemExit(1) from None


def _map_one(file: Any, name: str, pack: Any, output: str, trace: bool) -> None:
    from fhirbridge.fhir.bundle import transaction_bundle

    result = _read_and_transform(file, name, pack, trace=trace)
    if output == "ndjson":
        for resource in result.resources:
            sys.stdout.buffer.write(orjson.dumps(resource) + b"\n")
    else:
        bundle = transaction_bundle(result.resources)
        _emit({"bundle": bundle, "trace": result.trace} if trace else bundle)
    for u in result.unmapped:
        click.echo(
            f"note: {u.file}:{u.line} rule {u.rule}: a term is not in table {u.table}; "
            "kept as text",
            err=True,
        )


def _map_ndjson(file: Any, name: str, pack: Any, output: str) -> None:
    from fhirbridge.batch import LineError, map_lines

    total = _size_of(file)
    show = sys.stderr.isatty() and total is not None

    def report(error: LineError) -> None:
        for problem in error.problems:
            click.echo(f"{name}:{error.line}: {problem}", err=True)

    out = sys.stdout.buffer
    if show:
        progress: Any = click.progressbar(length=total, label="mapping", file=sys.stderr)
        with progress as bar:
            stats = map_lines(
                file,
                out,
                pack=pack,
                now=lambda: datetime.now(UTC),
                output=output,
                on_line=lambda _n, size: bar.update(size),
                on_error=report,
            )
    else:
        stats = map_lines(
            file, out, pack=pack, now=lambda: datetime.now(UTC), output=output, on_error=report
        )
    out.flush()
    for table, count in sorted(stats.unmapped.items()):
        click.echo(f"note: {count} term(s) not in table {table}; kept as text", err=True)
    click.echo(
        f"{stats.submissions} submissions: {stats.submissions - stats.failed} mapped, "
        f"{stats.failed} failed, {stats.resources} resources",
        err=True,
    )
    if stats.failed:
        raise SystemExit(1)


def _size_of(file: Any) -> int | None:
    try:
        return int(os.fstat(file.fileno()).st_size) or None
    except (OSError, ValueError, AttributeError):
        return None


@main.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path(allow_dash=True))
def validate_command(files: tuple[str, ...]) -> None:
    """Check FHIR R4 FILEs (a resource, a Bundle or NDJSON; - for stdin).

    Checks the R4B models, the official R4 JSON Schema and the R4 vital-signs profiles; prints
    FILE:LINE: severity location: message per issue, then a summary. NDJSON (.ndjson, or one
    object per line) is streamed line by line. Exit status: 0 no error, 1 errors, 2 unreadable
    or malformed input.
    """
    from fhirbridge.fhir.checker import check_stream, format_issue
    from fhirbridge.fhir.validate import OutputValidator

    validator = OutputValidator()
    resources = issues = 0
    failed = broken = False
    for name in files:
        try:
            stream = sys.stdin.buffer if name == "-" else open(name, "rb")  # noqa: SIM115
        except OSError as exc:
            click.echo(f"{name}: cannot read: {exc.strerror or type(exc).__name__}", err=True)
            broken = True
            continue
        try:
            for checked in check_stream(name, stream, validator=validator):
                resources += checked.resources
                failed |= checked.failed
                broken |= checked.malformed
                for line, issue in checked.findings:
                    click.echo(format_issue(name, line, issue))
                    issues += 1
        except OSError as exc:  # e.g. a directory, or a read error half-way
            click.echo(f"{name}: cannot read: {exc.strerror or type(exc).__name__}", err=True)
            broken = True
        finally:
            if stream is not sys.stdin.buffer:
                stream.close()
    click.echo(f"{resources} resources, {issues} issues")
    raise SystemExit(2 if broken else 1 if failed else 0)


@main.group()
def mappings() -> None:
    """Work with mapping packs."""


@mappings.command("validate")
@click.argument("directory", required=False, type=click.Path(path_type=Path, file_okay=False))
def mappings_validate(directory: Path | None) -> None:
    """Load, compile and statically check the pack in DIRECTORY (default: the configured one).

    Errors name file, line and rule: unknown source fields, FHIR elements that do not exist in
    R4, unknown code systems. Source fields no rule reads are listed as coverage information.
    Exit status: 0 clean, 1 check errors, 2 the pack does not load.
    """
    from fhirbridge.mapping.check import check_pack

    pack = _load_pack(directory)
    report = check_pack(pack)
    for finding in report.findings:
        click.echo(f"{finding.severity}: {finding}", err=True)
    for unread in report.unread_fields:
        click.echo(f"information: coverage: source field {unread} is read by no rule", err=True)
    errors = len(report.errors)
    click.echo(
        f"{pack.name} v{pack.version}: {len(pack.files)} files, {len(pack.rules)} rules, "
        f"{len(pack.tables)} tables: " + (f"{errors} error(s)" if errors else "OK")
    )
    if errors:
        raise SystemExit(1)


@mappings.command("test")
@click.argument("directory", required=False, type=click.Path(path_type=Path, file_okay=False))
@click.option("--update", is_flag=True, help="Re-record the expected Bundles (after review).")
def mappings_test(directory: Path | None, update: bool) -> None:
    """Run the pack's golden fixtures: map, validate (R4B + official R4 schema), compare."""
    from fhirbridge.fhir.validate import OutputValidator
    from fhirbridge.goldens import fixture_cases, run_case

    pack = _load_pack(directory)
    cases = fixture_cases(pack)
    if not cases:
        click.echo(f"{pack.name}: no fixtures (*.in.json) in the pack's fixtures folder", err=True)
        raise SystemExit(1)
    validator = OutputValidator()
    failed = 0
    for case in cases:
        result = run_case(pack, case, update=update, validator=validator)
        status = "updated" if result.updated else ("ok" if result.passed else "FAILED")
        click.echo(f"{result.name}: {status}")
        if not result.passed:
            failed += 1
            for problem in result.problems:
                click.echo(f"  {problem}")
            if result.diff:
                click.echo(result.diff.rstrip("\n"))
    click.echo(f"{len(cases) - failed} passed, {failed} failed")
    if failed:
        raise SystemExit(1)


@mappings.command("export-conceptmaps")
@click.argument("directory", required=False, type=click.Path(path_type=Path, file_okay=False))
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Write ConceptMap-<table>.json files here (default: one collection Bundle on stdout).",
)
def mappings_export_conceptmaps(directory: Path | None, out_dir: Path | None) -> None:
    """Export the code tables of the pack in DIRECTORY as FHIR R4 ConceptMaps.

    Every ConceptMap is validated (R4B + official R4 schema) before anything is written. Value
    tables (rows that are not codes) have no ConceptMap and are named on stderr.
    Exit status: 0 written, 1 a ConceptMap is invalid, 2 the pack does not load.
    """
    from fhirbridge.fhir.conceptmap import collection_bundle, table_to_conceptmap
    from fhirbridge.fhir.validate import OutputValidator

    pack = _load_pack(directory)
    validator = OutputValidator()
    maps: list[tuple[str, dict[str, Any]]] = []
    invalid = 0
    for name in sorted(pack.tables):
        table = pack.tables[name]
        conceptmap = table_to_conceptmap(table, pack)
        if conceptmap is None:
            click.echo(
                f"note: {table.file}: table {name} holds values, not codes: skipped", err=True
            )
            continue
        for issue in validator.validate(conceptmap):
            invalid += 1
            where = ", ".join(issue.expression) or "-"
            click.echo(f"error: {table.file}: ConceptMap {where}: {issue.diagnostics}", err=True)
        maps.append((name, conceptmap))
    if invalid:
        raise SystemExit(1)
    if out_dir is None:
        _emit(collection_bundle(conceptmap for _, conceptmap in maps))
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, conceptmap in maps:
        path = out_dir / f"ConceptMap-{name}.json"
        path.write_bytes(orjson.dumps(conceptmap, option=orjson.OPT_INDENT_2) + b"\n")
    click.echo(f"{len(maps)} ConceptMaps written to {out_dir}")


# --------------------------------------------------------------------------------------------
# fhirbridge sync: status, dead letters, replay, plan (targets from FHIRBRIDGE_TARGETS)
# --------------------------------------------------------------------------------------------


@main.group()
def sync() -> None:
    """Delivery to hospital FHIR servers (FHIRBRIDGE_TARGETS): status, dead letters, plan."""


def _sync_targets() -> list[Any]:
    """The targets of FHIRBRIDGE_TARGETS; exit 2 when unset or invalid (the file's problems)."""
    from fhirbridge.sync.targets import TargetConfigError, load_targets

    path = Settings().targets
    if not path:
        click.echo("no targets: set FHIRBRIDGE_TARGETS to a targets YAML file", err=True)
        raise SystemExit(2)
    try:
        return load_targets(path)
    except TargetConfigError as exc:
        click.echo(str(exc), err=True)
        raise SystemExit(2) from None


def _sync_target(targets: list[Any], name: str) -> Any:
    for target in targets:
        if target.name == name:
            return target
    have = ", ".join(t.name for t in targets) or "none"
    click.echo(f"no target named {name!r} in FHIRBRIDGE_TARGETS (have: {have})", err=True)
    raise SystemExit(2)


def _sync_outbox(targets: list[Any]) -> Any:
    """The outbox of the configured database, or None when that database has no ledger yet.

    Creates nothing: a SQLite file that does not exist, or a database without the delivery
    table, has no ledger. An unreachable database exits 1 (its URL is never printed).
    """
    from sqlalchemy import inspect, make_url
    from sqlalchemy.exc import SQLAlchemyError

    from fhirbridge.store.resources import ResourceStore
    from fhirbridge.store.schema import delivery
    from fhirbridge.sync.outbox import Outbox
    from fhirbridge.sync.runtime import routes

    url = Settings().database_url
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database in ("", ":memory:") or not Path(database).is_file():
            return None
    store = ResourceStore.from_url(url)
    try:
        has_ledger = inspect(store.engine).has_table(delivery.name)
    except SQLAlchemyError as exc:
        store.close()
        click.echo(f"cannot read the database: {type(exc).__name__}", err=True)
        raise SystemExit(1) from None
    if not has_ledger:
        store.close()
        return None
    _check_schema(store, Settings())
    return Outbox(store, routes(targets))


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    whole = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if whole >= size:
            return f"{whole // size}{unit}"
    return f"{whole}s"


@sync.command("status")
@click.option("--json", "as_json", is_flag=True, help="The same JSON as GET /api/v1/sync/status.")
def sync_status(as_json: bool) -> None:
    """Per target: queued, in flight, sent, failed, dead-lettered; last success and error."""
    from fhirbridge.api.sync import status_body

    targets = _sync_targets()
    configured = {t.name: t.summary() for t in targets}
    outbox = _sync_outbox(targets)
    body = status_body(outbox, configured, datetime.now(UTC))
    if outbox is not None:
        outbox.store.close()
    if as_json:
        _emit(body)
        return
    for t in body["targets"]:
        where = f"{t['profile']}, {t['baseUrl']}" if t["configured"] else "no longer configured"
        click.echo(f"{t['name']} ({where})")
        click.echo(
            f"  queued {t['queued']}, in flight {t['inFlight']}, sent {t['sent']}, "
            f"failed {t['failed']}, dead-lettered {t['deadLettered']}, waiting {t['waiting']}, "
            f"fallback {t['fallback']}, skipped {t['skipped']}"
        )
        click.echo(f"  oldest waiting: {_age(t['oldestWaitingSeconds'])}")
        click.echo(f"  last success: {t['lastSuccessAt'] or 'never'}")
        error = t["lastError"]
        if error is None:
            click.echo("  last error: none")
        else:
            click.echo(
                f"  last error: {error['at']} {error['resourceType']}/{error['id']} "
                f"({error['status']}): {error['error']}"
            )


@sync.command("dead-letters")
@click.option("--target", "target_name", help="Only this target's dead letters.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 10000))
@click.option("--json", "as_json", is_flag=True, help="One JSON array of deliveries.")
def sync_dead_letters(target_name: str | None, limit: int, as_json: bool) -> None:
    """List dead-lettered deliveries, newest first: what failed and why (PHI-free)."""
    targets = _sync_targets()
    if target_name is not None:
        _sync_target(targets, target_name)
    outbox = _sync_outbox(targets)
    rows = []
    if outbox is not None:
        rows = outbox.deliveries(target=target_name, status="dead", limit=limit)
        outbox.store.close()
    if as_json:
        _emit([d.to_dict() for d in rows])
        return
    for d in rows:
        click.echo(
            f"{d.target} {d.resource_type}/{d.resource_id} v{d.want_version} "
            f"attempts {d.attempts} at {d.updated_at.isoformat()}: {d.last_error or '-'}"
        )
    click.echo(f"{len(rows)} dead letter(s)", err=True)


@sync.command("replay")
@click.option("--target", "target_name", required=True, help="The target to send them to.")
@click.argument("keys", nargs=-1, metavar="[TYPE/ID]...")
def sync_replay(target_name: str, keys: tuple[str, ...]) -> None:
    """Queue dead letters of a target again: those named (TYPE/ID), or all of them.

    Exit status 1 when a named resource is not a dead letter of the target.
    """
    parsed: list[tuple[str, str]] = []
    for key in keys:
        rtype, _, rid = key.partition("/")
        if not rtype or not rid:
            raise click.UsageError(f"{key!r} is not TYPE/ID (e.g. Observation/<id>)")
        parsed.append((rtype, rid))
    targets = _sync_targets()
    _sync_target(targets, target_name)
    outbox = _sync_outbox(targets)
    missing, count = list(parsed), 0
    if outbox is not None:
        now = datetime.now(UTC)
        if parsed:
            rows = outbox.ledger(target_name, parsed)
            missing = [k for k in parsed if k not in rows or rows[k].status != "dead"]
            found = [k for k in parsed if k not in missing]
            count = outbox.replay(target_name, found, now=now) if found else 0
        else:
            count = outbox.replay(target_name, None, now=now)
        outbox.store.close()
    for rtype, rid in missing:
        click.echo(f"{rtype}/{rid}: not a dead letter of {target_name}", err=True)
    click.echo(f"{count} dead letter(s) of {target_name} queued again")
    if missing:
        raise SystemExit(1)


@sync.command("plan")
@click.argument("submission", type=click.File("rb"))
@click.option("--target", "target_name", required=True, help="The target to plan for.")
@click.option(
    "--profile",
    type=click.Choice(["generic-r4", "epic", "oracle-health"]),
    help="Plan against this shipped profile instead of the target's (no /metadata for auto).",
)
@click.option("--fresh", is_flag=True, help="Ignore the ledger: as if nothing had been sent.")
@click.option(
    "--assume-patient",
    metavar="ID",
    help="Plan as if our Patient were matched to Patient/ID on the target.",
)
@click.option(
    "--assume-encounter",
    metavar="ID",
    help="Plan as if our Encounters were the target's Encounter/ID (targets needing one).",
)
@click.option("--json", "as_json", is_flag=True, help="The plan as JSON, with request bodies.")
def sync_plan(
    submission: Any,
    target_name: str,
    profile: str | None,
    fresh: bool,
    assume_patient: str | None,
    assume_encounter: str | None,
    as_json: bool,
) -> None:
    """Print what the worker would send to a target for SUBMISSION (- for stdin); sends nothing.

    The submission is mapped with the configured pack and planned against what the ledger in
    the configured database says the target already holds (nothing, when it has no rows).
    Profile `auto` reads the target's CapabilityStatement (one GET /metadata) unless --profile
    is given. No search is made on the target: where the worker would first match the patient
    or look up an existing encounter (Epic), the plan shows that step and what waits for it;
    --assume-patient / --assume-encounter show the plan that follows.
    """
    from fhirbridge.sync import planner
    from fhirbridge.sync.worker import references_of

    targets = _sync_targets()
    target = _sync_target(targets, target_name)
    pack = _load_pack(None)
    name = getattr(submission, "name", "-")
    result = _read_and_transform(submission, name, pack)
    caps = _sync_capabilities(target, profile)
    resources: list[dict[str, Any]] = result.resources
    keys = [(r["resourceType"], r["id"]) for r in resources]
    outbox = None if fresh else _sync_outbox(targets)
    rows: dict[tuple[str, str], Any] = {}
    versions: dict[tuple[str, str], str] = {}
    server_refs: dict[str, str] = {}
    if outbox is not None:
        rows = outbox.ledger(target.name, keys)
        if rows:
            versions = _sync_versions(outbox.store, resources)
            server_refs = outbox.server_refs(target.name, references_of(resources))
        outbox.store.close()
    if rows:
        click.echo(
            f"note: using the ledger: {len(rows)} of {len(keys)} resources have a delivery "
            f"row for {target.name}",
            err=True,
        )
    else:
        click.echo(f"note: planned as if nothing had been delivered to {target.name} yet", err=True)
    if caps.requires_existing_encounter and assume_encounter is None:
        click.echo(
            "note: the worker looks up the target's encounters before writing; sync plan does "
            "not (--assume-encounter ID), so records that need one show as waiting",
            err=True,
        )
    due = []
    for resource in resources:
        key = (resource["resourceType"], resource["id"])
        row = rows.get(key)
        ledger = None
        if row is not None:
            ledger = planner.Ledger(
                server_id=row.server_id,
                server_version=row.server_version,
                sent_version=None if row.sent_version is None else str(row.sent_version),
                state=row.status,
            )
        due.append(planner.Due(resource, versions.get(key, "1"), ledger))
    patient = next((f"Patient/{i}" for t, i in keys if t == "Patient"), None)
    patient_ref = server_refs.get(patient) if patient else None
    if assume_patient is not None:
        patient_ref = f"Patient/{assume_patient}"
    encounters: dict[str, str] = {}
    if assume_encounter is not None:
        encounters = {
            f"Encounter/{i}": f"Encounter/{assume_encounter}" for t, i in keys if t == "Encounter"
        }
    plan = planner.plan(
        target,
        caps,
        due,
        server_refs=server_refs,
        patient_ref=patient_ref,
        encounter_refs=encounters,
    )
    if any(isinstance(step, planner.MatchPatient) for step in plan.steps):
        click.echo(
            "note: the worker matches the patient first and then plans the rest; "
            "--assume-patient ID shows that plan",
            err=True,
        )
    if as_json:
        _emit(plan.to_dict())
    else:
        click.echo(planner.render(plan))


def _sync_capabilities(target: Any, profile: str | None) -> Any:
    """The shipped profile (``--profile`` or the target's), or the target's /metadata (auto)."""
    from fhirbridge.sync.capabilities import load_profile

    if profile is not None or target.profile != "auto":
        return load_profile(profile or target.profile)
    from fhirbridge.sync.runtime import build_runtime

    click.echo(
        f"note: {target.name} has profile auto: reading its CapabilityStatement "
        f"(GET {target.base_url}/metadata, read-only; nothing is sent). "
        "--profile plans against a shipped profile instead.",
        err=True,
    )
    try:
        runtime = build_runtime(target)
    except (FhirbridgeError, ValueError) as exc:  # EhrError, AuthError, CapabilityError
        click.echo(f"cannot read the CapabilityStatement of {target.name}: {exc}", err=True)
        raise SystemExit(1) from None
    runtime.client.close()
    return runtime.caps


def _sync_versions(store: Any, resources: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    """Our version of each mapped resource if the submission were stored now (as the store
    decides: meta stamps ignored; the import's Provenance kept when nothing else changed)."""
    from fhirbridge.errors import GoneError, NotFoundError

    def bare(resource: dict[str, Any]) -> dict[str, Any]:
        body = dict(resource)
        meta = body.pop("meta", None)
        if isinstance(meta, dict):
            rest = {k: v for k, v in meta.items() if k not in ("versionId", "lastUpdated")}
            if rest:
                body["meta"] = rest
        return body

    stored: dict[tuple[str, str], tuple[str, bool]] = {}  # key → (version, unchanged)
    for resource in resources:
        key = (resource["resourceType"], resource["id"])
        try:
            current = store.read_stored(*key)
        except (NotFoundError, GoneError):
            continue
        stored[key] = (current.version_id, bare(current.resource()) == bare(resource))
    changed = any(
        key not in stored or not stored[key][1]
        for key in ((r["resourceType"], r["id"]) for r in resources)
        if key[0] != "Provenance"
    )
    return {
        key: version if same or (key[0] == "Provenance" and not changed) else str(int(version) + 1)
        for key, (version, same) in stored.items()
    }


@main.group()
def db() -> None:
    """Database schema migrations (Alembic): upgrade, current, check."""


def _db_run(action: Any) -> Any:
    """Run `action(store)` on the configured database; a database error exits 1 (its type
    only: the URL may hold a password), a schema that cannot be brought to head exits 1."""
    from sqlalchemy.exc import SQLAlchemyError

    from fhirbridge.db import SchemaNotCurrentError
    from fhirbridge.store.resources import ResourceStore

    store = ResourceStore.from_url(Settings().database_url)
    try:
        return action(store)
    except SchemaNotCurrentError as exc:
        click.echo(str(exc), err=True)
        raise SystemExit(1) from None
    except SQLAlchemyError as exc:
        click.echo(f"cannot use the database: {type(exc).__name__}", err=True)
        raise SystemExit(1) from None
    finally:
        store.close()


@db.command("upgrade")
def db_upgrade() -> None:
    """Apply every pending migration (once per release, before the new version serves).

    A database created before migrations existed is adopted first when its tables are the
    expected ones. Safe to run from several places at once: one migrates, the others wait.
    """
    from fhirbridge.db import upgrade

    before, after = _db_run(upgrade)
    if before.at_head:
        click.echo(f"database already at {after.head} (head)", err=True)
    elif before.kind == "unversioned":
        click.echo(f"adopted the pre-migration database; upgraded to {after.current} (head)")
    else:
        click.echo(f"upgraded from {before.current or 'empty'} to {after.current} (head)")


@db.command("current")
def db_current() -> None:
    """Print the database's revision ('none' without migration history); stderr says more."""
    from fhirbridge.db import state

    now = _db_run(state)
    click.echo(now.current or "none")
    click.echo(now.describe(), err=True)


@db.command("check")
def db_check() -> None:
    """Exit 0 when the database is at the latest migration, 1 otherwise (say why on stderr)."""
    from fhirbridge.db import state

    now = _db_run(state)
    click.echo(now.describe(), err=True)
    if not now.at_head:
        raise SystemExit(1)


@db.command("revision")
@click.option("-m", "--message", required=True, help="What the schema change is and why.")
def db_revision(message: str) -> None:
    """Developers: write the next migration from what fhirbridge/store/schema.py adds (review
    it before committing: autogenerate cannot see renames)."""
    from fhirbridge.db import new_revision

    path = new_revision(message)
    if path is None:
        click.echo("schema.py and the latest migration agree: nothing to write", err=True)
        raise SystemExit(1)
    click.echo(str(path))


@main.group()
def config() -> None:
    """The service's configuration (FHIRBRIDGE_* environment variables)."""


@config.command("reference")
def config_reference() -> None:
    """Print every setting as a markdown table: env var, default, meaning (README copy)."""
    from fhirbridge.configref import markdown_table

    click.echo(markdown_table(), nl=False)


if __name__ == "__main__":  # pragma: no cover
    main()
