"""The `fhirbridge` console script: serve | map | mappings validate."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import orjson

from fhirbridge.errors import FhirbridgeError, MappingConfigError
from fhirbridge.settings import Settings


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


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8080, show_default=True, type=int)
@click.option("--workers", default=2, show_default=True, type=int, help="gunicorn workers.")
@click.option("--worker/--no-worker", "with_worker", default=True, show_default=True,
              help="Also run a sync worker process when FHIRBRIDGE_TARGETS is set.")
def serve(host: str, port: int, workers: int, with_worker: bool) -> None:
    """Serve the HTTP API with gunicorn (database: FHIRBRIDGE_DATABASE_URL, default SQLite)."""
    from gunicorn.app.base import BaseApplication

    from fhirbridge import create_app

    try:
        app = create_app()
    except MappingConfigError as exc:
        click.echo(str(exc), err=True)
        raise SystemExit(2) from None

    class _Server(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            self.cfg.set("bind", f"{host}:{port}")
            self.cfg.set("workers", workers)
            self.cfg.set("accesslog", None)

        def load(self) -> Any:
            return app

    click.echo(f"fhirbridge serving on http://{host}:{port} (FHIR API at /fhir)", err=True)
    settings = Settings()
    sync = None
    if settings.targets and with_worker:
        # The embedded default runs one sync worker beside the server: its own process, so it
        # neither shares connections across gunicorn's fork nor stops when a web worker does.
        sync = subprocess.Popen([sys.executable, "-m", "fhirbridge.cli", "worker"])
        click.echo(f"sync worker started (pid {sync.pid})", err=True)
    try:
        _Server().run()
    finally:
        if sync is not None:
            sync.terminate()
            sync.wait(timeout=30)


@main.command()
@click.option("--once", is_flag=True, help="One pass over every target, then exit.")
def worker(once: bool) -> None:
    """Deliver queued resources to the targets in FHIRBRIDGE_TARGETS until stopped (SIGTERM)."""
    from fhirbridge.store.resources import ResourceStore
    from fhirbridge.sync.outbox import Outbox
    from fhirbridge.sync.runtime import build_runtimes, routes
    from fhirbridge.sync.targets import TargetConfigError, load_targets
    from fhirbridge.sync.worker import Worker

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
    store.create_schema()
    runner = Worker(store, Outbox(store, routes(targets)), build_runtimes(targets),
                    lease=timedelta(seconds=settings.worker_lease_seconds))
    if once:
        handled = runner.run_once()
        click.echo(f"{handled} deliveries handled", err=True)
        return
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    click.echo(f"sync worker {runner.owner}: {len(targets)} target(s)", err=True)
    runner.run(stop, idle_seconds=settings.worker_idle_seconds)
    store.close()


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


def _map_one(file: Any, name: str, pack: Any, output: str, trace: bool) -> None:
    from fhirbridge.fhir.bundle import transaction_bundle
    from fhirbridge.fhir.validate import OutputValidator
    from fhirbridge.pipeline import transform
    from fhirbridge.validation import SubmissionValidator

    try:
        document = orjson.loads(file.read())
    except orjson.JSONDecodeError as exc:
        click.echo(f"{name}: malformed JSON at line {exc.lineno}, column {exc.colno}", err=True)
        raise SystemExit(1) from None
    try:
        result = transform(
            document,
            pack=pack,
            input_validator=SubmissionValidator(pack.source_schema, pack.integrity),
            output_validator=OutputValidator(),
            now=datetime.now(UTC),
            trace=trace,
        )
    except FhirbridgeError as exc:
        for issue in exc.issues:
            where = ", ".join(issue.expression) or "-"
            click.echo(f"{where}: {issue.diagnostics}", err=True)
        raise SystemExit(1) from None
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


if __name__ == "__main__":  # pragma: no cover
    main()
