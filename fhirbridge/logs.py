"""Structured logs: one JSON object per line, a request id on every line logged in a request.

`configure(level, fmt)` gives the root logger one handler (stderr, JSON or text); calling it
again replaces that handler, never adds a second. Third-party loggers that would print patient
data (URLs with query strings, SQL parameters, request lines) are held at WARNING, whatever the
level. `init_app(app, settings)` adds the request id (X-Request-ID in when well-formed, else a
new one; always echoed in the answer) and one access line per request on `fhirbridge.access`:
method, route *template*, status, duration, client id. Never a path with values, a query string
or a body: those carry names, MRNs and birth dates (`Patient?identifier=…`).
"""

from __future__ import annotations

import logging
import re
import sys
import time
import uuid
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Literal, TextIO

from flask import Flask, Response, g, request
from flask.logging import default_handler
from gunicorn.glogging import Logger
from pythonjsonlogger.json import JsonFormatter

from fhirbridge.api.access import current_principal

if TYPE_CHECKING:
    from fhirbridge.settings import Settings

__all__ = [
    "QUIET_LOGGERS",
    "REQUEST_ID_HEADER",
    "GunicornLogger",
    "configure",
    "current_request_id",
    "init_app",
    "is_configured",
]

REQUEST_ID_HEADER: Final = "X-Request-ID"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

# The id of the request being handled in this thread (None outside a request).
_request_id: ContextVar[str | None] = ContextVar("fhirbridge_request_id", default=None)

access_log = logging.getLogger("fhirbridge.access")

#: Loggers held at WARNING even when FHIRBRIDGE_LOG_LEVEL=DEBUG, and why.
QUIET_LOGGERS: Final[dict[str, str]] = {
    # DEBUG '"GET /fhir/Patient?identifier=urn:…|MRN-448812 HTTP/1.1" 200': every request line
    # with its query string; the worker's search-then-create puts MRNs in those queries.
    "urllib3": "request lines with query strings (MRNs of patient searches)",
    # INFO/DEBUG: every SQL statement and its bound parameters (resource bodies, search
    # values); the engines are also created with hide_parameters=True, this is the second lock.
    "sqlalchemy.engine": "SQL with bound parameters (resource bodies, search values)",
    # INFO: the development server's request lines, path and query string included
    # (GET /fhir/Patient?name=… 200).
    "werkzeug": "request lines with query strings (search values)",
    # DEBUG in some versions and adapters: redirects and URLs with their query strings.
    "requests": "URLs with query strings",
    # INFO: gunicorn's access line is the full request line, query string included; our own
    # access line (fhirbridge.access) logs the route template instead.
    "gunicorn.access": "request lines with query strings (search values)",
}

Format = Literal["json", "text"]


def _utc_iso(created: float) -> str:
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")


class JsonLineFormatter(JsonFormatter):
    """time (UTC ISO 8601), level, logger, message, then request_id and any extras."""

    def __init__(self) -> None:
        super().__init__(
            ["levelname", "name", "message"],
            rename_fields={"levelname": "level", "name": "logger"},
            json_ensure_ascii=False,
        )

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        log_data["time"] = _utc_iso(record.created)
        super().add_fields(log_data, record, message_dict)


class TextFormatter(logging.Formatter):
    """Development: `time level logger [request id] message`."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s%(rid)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", None)
        record.rid = f" [{rid}]" if rid else ""
        return f"{_utc_iso(record.created)} {super().format(record)}"


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every record emitted while a request is handled."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = _request_id.get()
        if rid is not None and not hasattr(record, "request_id"):
            record.request_id = rid
        return True


class _RootHandler(logging.StreamHandler[TextIO]):
    """The handler `configure` installs: its stream, else the current sys.stderr, looked up on
    every record (a stream swapped later, by a test runner say, is never a stale one)."""

    def __init__(self, stream: TextIO | None) -> None:
        logging.Handler.__init__(self)
        self._target = stream

    @property
    def stream(self) -> TextIO:
        return self._target if self._target is not None else sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        self._target = value


def _level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    number = logging.getLevelNamesMapping().get(level.strip().upper())
    if number is None:
        raise ValueError(f"unknown log level {level!r} (DEBUG, INFO, WARNING, ERROR, CRITICAL)")
    return number


def configure(
    level: str | int = "INFO", fmt: Format = "json", *, stream: TextIO | None = None
) -> logging.Handler:
    """Log from the root logger at `level` to `stream` (default stderr), as JSON lines or text.

    Idempotent: the handler of an earlier call is replaced, other handlers are left alone.
    """
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _RootHandler)]:
        root.removeHandler(old)
    handler = _RootHandler(stream)
    handler.setFormatter(JsonLineFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root.addHandler(handler)
    root.setLevel(_level(level))
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    return handler


def is_configured() -> bool:
    """Whether `configure` has installed its handler on the root logger."""
    return any(isinstance(h, _RootHandler) for h in logging.getLogger().handlers)


def current_request_id() -> str | None:
    """The id of the request being handled, None outside a request."""
    return _request_id.get()


# ---------------------------------------------------------------- requests


def _accepted(value: str | None) -> str | None:
    """The caller's X-Request-ID when well-formed (it is logged: nothing else gets through)."""
    if value is not None and _REQUEST_ID.fullmatch(value):
        return value
    return None


def _begin() -> None:
    rid = _accepted(request.headers.get(REQUEST_ID_HEADER)) or uuid.uuid4().hex
    g.request_id = rid
    g.fhirbridge_request_started = time.perf_counter()
    _request_id.set(rid)


def _finish(response: Response) -> Response:
    if "request_id" not in g:  # a hook before ours refused the request
        _begin()
    response.headers[REQUEST_ID_HEADER] = g.request_id
    duration_ms = round((time.perf_counter() - g.fhirbridge_request_started) * 1000, 1)
    # The route template (/fhir/<rtype>/<rid>), never request.path or the query string.
    route = request.url_rule.rule if request.url_rule is not None else None
    client_id = current_principal().client_id
    access_log.info(
        "%s %s %d %.1f ms",
        request.method,
        route or "-",
        response.status_code,
        duration_ms,
        extra={
            "method": request.method,
            "route": route,
            "status": response.status_code,
            "duration_ms": duration_ms,
            "client_id": client_id,
        },
    )
    return response


def _end(_exc: BaseException | None) -> None:
    _request_id.set(None)


def init_app(app: Flask, settings: Settings) -> None:
    """Request ids and the access log; configures logging from settings if nobody has yet."""
    if not is_configured():  # e.g. gunicorn "fhirbridge:create_app()" without the CLI
        configure(settings.log_level, settings.log_format)
    app.logger.removeHandler(default_handler)  # records propagate to the root handler
    # First in line: the request id exists before any other hook can refuse the request, and
    # the access line is written after every other after_request hook has had its say.
    app.before_request_funcs.setdefault(None, []).insert(0, _begin)
    app.after_request_funcs.setdefault(None, []).insert(0, _finish)
    app.teardown_request(_end)


# ---------------------------------------------------------------- gunicorn


class GunicornLogger(Logger):  # type: ignore[misc]
    """gunicorn's logger with its error log sent through the root (JSON) handler, and its
    access log silenced: its line is the request line, query string included
    (fhirbridge.access logs the route template instead).

    `fhirbridge serve` sets it; so does fhirbridge/gunicorn_conf.py for a bare gunicorn, where
    the master logs before any app exists: logging is configured here from settings then.
    """

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        if not is_configured():
            _configure_from_settings()
        for log in (self.error_log, self.access_log):
            for handler in list(log.handlers):
                log.removeHandler(handler)
            log.propagate = True
        self.access_log.setLevel(logging.WARNING)


def _configure_from_settings() -> None:
    from fhirbridge.settings import Settings

    try:
        settings = Settings()
        configure(settings.log_level, settings.log_format)
    except ValueError:  # bad settings: create_app reports them; log meanwhile
        configure()
