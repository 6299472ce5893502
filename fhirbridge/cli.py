"""The `fhirbridge` console script: serve | map | mappings validate."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
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
def serve(host: str, port: int, workers: int) -> None:
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
    _Server().run()


@main.command("map")
@click.argument("file", type=click.File("rb"))
@click.option("--trace", is_flag=True, help="Also print, for every element, the rule that made it.")
@click.option(
    "--mappings",
    "mappings_dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Mapping pack folder (default: FHIRBRIDGE_MAPPINGS_DIR or the shipped pack).",
)
def map_command(file: Any, trace: bool, mappings_dir: Path | None) -> None:
    """Map one submission FILE (- for stdin) to a FHIR transaction Bundle on stdout."""
    from fhirbridge.fhir.bundle import transaction_bundle
    from fhirbridge.fhir.validate import OutputValidator
    from fhirbridge.pipeline import transform
    from fhirbridge.validation import SubmissionValidator

    pack = _load_pack(mappings_dir)
    try:
        document = orjson.loads(file.read())
    except orjson.JSONDecodeError as exc:
        name = getattr(file, "name", "-")
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
    bundle = transaction_bundle(result.resources)
    _emit({"bundle": bundle, "trace": result.trace} if trace else bundle)
    for u in result.unmapped:
        click.echo(
            f"note: {u.file}:{u.line} rule {u.rule}: a term is not in table {u.table}; "
            "kept as text",
            err=True,
        )


@main.group()
def mappings() -> None:
    """Work with mapping packs."""


@mappings.command("validate")
@click.argument("directory", required=False, type=click.Path(path_type=Path, file_okay=False))
def mappings_validate(directory: Path | None) -> None:
    """Load and compile the pack in DIRECTORY; print every problem with file:line."""
    pack = _load_pack(directory)
    rules = len(pack.rules)
    click.echo(
        f"{pack.name} v{pack.version}: {len(pack.files)} files, {rules} rules, "
        f"{len(pack.tables)} tables: OK"
    )


if __name__ == "__main__":  # pragma: no cover
    main()
