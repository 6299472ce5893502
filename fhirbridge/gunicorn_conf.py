"""gunicorn settings for the container, its start-up checks, and the hooks of fhirbridge's workers.

    gunicorn -c python:fhirbridge.gunicorn_conf 'fhirbridge:create_app()'

Defaults, each overridable on gunicorn's command line or in GUNICORN_CMD_ARGS:

- ``bind`` 127.0.0.1:8080, as ``fhirbridge serve``; a container passes ``--bind 0.0.0.0:8080``
  and then must configure authentication (see `on_starting`).
- ``workers`` from WEB_CONCURRENCY (gunicorn's and most platforms' convention), else 2.
- ``accesslog`` off: gunicorn's access line carries the query string, and FHIR search
  parameters are patient data (names, birth dates, identifiers). fhirbridge logs each request
  itself with the route template instead (fhirbridge.logs).
- ``forwarded_allow_ips`` is not set here: only the deployment knows which proxy to trust.

`on_starting` runs in the master before any socket is bound, and does what `fhirbridge serve`
does before it starts gunicorn:

1. with no authentication configured, only loopback addresses may be bound
   (fhirbridge.auth.check_bind); loopback without auth logs a loud warning;
2. PROMETHEUS_MULTIPROC_DIR starts empty (a restarted container reuses pids);
3. the app is built once, in the master, and every worker is forked from it (gunicorn's
   preload): the modules, the mapping pack and the R4 schema validator are built once and
   their memory shared, instead of each worker building its own, and a bad setting, a broken
   mapping pack or a database behind this version's migrations stops the master with one
   error line before a worker exists.

Each of them refusing stops the master with exit status 2. ``preload_app`` itself is not set:
gunicorn would load the app before `on_starting`, so before the bind check, and report a
refusal as a traceback with exit status 1.

Sharing the app across fork is sound because of the worker hooks below: a worker drops the
database connections it inherited (`WorkerHooks.post_worker_init`) and opens its own, and
prometheus_client opens per-process metric files once it sees a new pid. The master keeps the
connection of its migration check; it never uses it again.

A HUP builds the app again (`on_reload`) before the new workers are forked, so it still picks
up changed settings files and mappings; if that build is refused, the error is logged and the
new workers serve the app that was running.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

bind = ["127.0.0.1:8080"]
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
accesslog = None
# gunicorn's own lines (start, workers, errors) as JSON through fhirbridge's root handler.
logger_class = "fhirbridge.logs.GunicornLogger"


def on_starting(server: Any) -> None:
    """gunicorn master hook, before any socket is bound: refuse no-auth on a non-loopback bind,
    start with an empty PROMETHEUS_MULTIPROC_DIR, build the app (see the module docstring)."""
    with start_up_objects_frozen():
        from pydantic import ValidationError

        from fhirbridge.metrics import clear_multiprocess_dir

        clear_multiprocess_dir()

        from fhirbridge.auth import BindRefused, auth_configured, check_bind
        from fhirbridge.settings import Settings

        try:
            warning = check_bind(server.cfg.bind, auth_configured(Settings()))
        except (BindRefused, ValidationError, ValueError) as exc:
            _refuse(server, exc)
        if warning:
            print(warning, file=sys.stderr, flush=True)
            server.log.warning(
                "fhirbridge: authentication is off: every caller gets every scope (loopback only)"
            )
        try:
            app = server.app.wsgi()
        except _start_up_errors() as exc:
            _refuse(server, exc)
    _use(app)


def on_reload(server: Any) -> None:
    """gunicorn HUP hook, before the new workers are forked: build the app again from the
    current settings and mappings; refused, keep the running one (the error is logged)."""
    running = server.app.callable
    server.app.callable = None
    try:
        with start_up_objects_frozen():
            app = server.app.wsgi()
    except _start_up_errors() as exc:
        server.app.callable = running
        server.log.error(
            "fhirbridge: reload refused, still serving the running app: %s", _describe(exc)
        )
        return
    if "fhirbridge" in getattr(running, "extensions", {}):
        running.extensions["fhirbridge"].store.close()  # the master's connection to it
    del running
    # The replaced app was frozen with the rest: collect its cycles, then freeze the new one.
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    _use(app)


def post_worker_init(worker: Any) -> None:
    """gunicorn hook, in a new worker before its first request: see `WorkerHooks`."""
    if _hooks is not None:
        _hooks.post_worker_init(worker)


def pre_request(worker: Any, req: Any) -> None:
    if _hooks is not None:
        _hooks.pre_request(worker, req)


def post_request(worker: Any, req: Any, environ: Any, resp: Any) -> None:
    if _hooks is not None:
        _hooks.post_request(worker, req, environ, resp)


def child_exit(server: Any, worker: Any) -> None:
    """gunicorn hook: a dead worker's live gauges leave /metrics (its counters stay)."""
    from fhirbridge.metrics import child_exit as drop_worker

    drop_worker(server, worker)


def _start_up_errors() -> tuple[type[Exception], ...]:
    """What refuses a start with one line (exit 2), as `fhirbridge serve` does; anything else
    (a database that does not answer, a bug) keeps its traceback."""
    from pydantic import ValidationError

    from fhirbridge.auth import AuthConfigError
    from fhirbridge.db import SchemaNotCurrentError
    from fhirbridge.errors import MappingConfigError

    return (MappingConfigError, SchemaNotCurrentError, AuthConfigError, ValidationError)


def _refuse(server: Any, exc: Exception) -> NoReturn:
    server.log.error("fhirbridge: %s", _describe(exc))
    if getattr(server, "pidfile", None) is not None:
        server.pidfile.unlink()
    raise SystemExit(2) from None


def _describe(exc: Exception) -> str:
    """The error without setting values (a bad FHIRBRIDGE_* value may be a secret)."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        fields = sorted({str(e["loc"][0]).upper() for e in exc.errors() if e["loc"]})
        return "invalid settings: " + ", ".join(f"FHIRBRIDGE_{f}" for f in fields)
    return str(exc)


# ------------------------------------------------- shared with `fhirbridge serve` (fhirbridge.cli)


@contextmanager
def start_up_objects_frozen() -> Iterator[None]:
    """No cyclic garbage collection while the master builds the app, then freeze what it built.

    Start-up makes ~200,000 objects that live as long as the server (modules, models, the
    schema, the app); each collection would only walk them again, ~10% of start-up (issue 6).
    gc.freeze() leaves them out of every later collection, in the workers too, which also keeps
    the pages the workers share with the master unwritten (the recipe of the gc module's docs:
    disable early, freeze before fork). The collector is back on however the block ends; the
    little cyclic garbage start-up made is frozen with the rest.
    """
    gc.disable()
    try:
        yield
        gc.freeze()
    finally:
        gc.enable()


#: A worker warms up after its first answer (or this long without one), once it has been
#: idle for WARM_UP_IDLE_SECONDS: never beside a request it could slow down.
WARM_UP_AFTER_SECONDS = 1.0
WARM_UP_IDLE_SECONDS = 0.2


class WorkerHooks:
    """gunicorn's hooks for the workers of an app built in the master, before forking."""

    def __init__(self, app: Any) -> None:
        self._services = app.extensions["fhirbridge"]
        self._answered = threading.Event()
        self._busy = False
        self._last_answer = 0.0

    def post_worker_init(self, worker: Any) -> None:
        # Not post_fork: until the worker has set its signal handlers, a SIGTERM goes to the
        # master's handler copied into it, and is lost; the less done before, the better.
        self._answered = threading.Event()  # this worker's own
        # The pooled connection of the master's migration check is the master's: a worker
        # must open its own (one socket or SQLite handle used by two processes corrupts).
        self._services.store.engine.dispose(close=False)
        # The emitted types' R4B models (~0.1-0.3 s), in the background so that the first
        # submission a worker takes does not pay them either (issue 6).
        threading.Thread(target=self._warm_up, name="fhirbridge-warm-up", daemon=True).start()

    def pre_request(self, worker: Any, req: Any) -> None:
        self._busy = True

    def post_request(self, worker: Any, req: Any, environ: Any, resp: Any) -> None:
        self._busy = False
        self._last_answer = time.monotonic()
        self._answered.set()

    def _warm_up(self) -> None:
        # Beside a request (the readiness probe first) it would only slow that answer down:
        # on two cores with two workers, /readyz came ~0.05-0.1 s later (issue 6).
        self._answered.wait(WARM_UP_AFTER_SECONDS)
        while self._busy or time.monotonic() - self._last_answer < WARM_UP_IDLE_SECONDS:
            time.sleep(WARM_UP_IDLE_SECONDS / 4)
        self._services.output_validator.warm()


_hooks: WorkerHooks | None = None


def _use(app: Any) -> None:
    """The workers forked from now on run `app`: its hooks (none for an app not fhirbridge's)."""
    global _hooks
    _hooks = WorkerHooks(app) if "fhirbridge" in getattr(app, "extensions", {}) else None
