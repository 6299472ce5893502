"""gunicorn settings for the container, and the start-up check that authentication is on.

    gunicorn -c python:fhirbridge.gunicorn_conf 'fhirbridge:create_app()'

Defaults, each overridable on gunicorn's command line or in GUNICORN_CMD_ARGS:

- ``bind`` 127.0.0.1:8080, as ``fhirbridge serve``; a container passes ``--bind 0.0.0.0:8080``
  and then must configure authentication (see `on_starting`).
- ``workers`` from WEB_CONCURRENCY (gunicorn's and most platforms' convention), else 2.
- ``accesslog`` off: gunicorn's access line carries the query string, and FHIR search
  parameters are patient data (names, birth dates, identifiers). fhirbridge logs each request
  itself with the route template instead (fhirbridge.logs).
- ``forwarded_allow_ips`` is not set here: only the deployment knows which proxy to trust.

`on_starting` applies the rule `fhirbridge serve` applies: with no authentication configured,
only loopback addresses may be bound (fhirbridge.auth.check_bind). Anything else stops the
master with exit status 2 before a socket is opened; loopback without auth logs a loud warning.
"""

from __future__ import annotations

import os
import sys
from typing import Any

bind = ["127.0.0.1:8080"]
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
accesslog = None
# gunicorn's own lines (start, workers, errors) as JSON through fhirbridge's root handler.
logger_class = "fhirbridge.logs.GunicornLogger"


def on_starting(server: Any) -> None:
    """gunicorn master hook, before any socket is bound: refuse no-auth on a non-loopback bind,
    and start with an empty PROMETHEUS_MULTIPROC_DIR (a restarted container reuses pids)."""
    from pydantic import ValidationError

    from fhirbridge.metrics import clear_multiprocess_dir

    clear_multiprocess_dir()

    from fhirbridge.auth import BindRefused, auth_configured, check_bind
    from fhirbridge.settings import Settings

    try:
        warning = check_bind(server.cfg.bind, auth_configured(Settings()))
    except (BindRefused, ValidationError, ValueError) as exc:
        server.log.error("fhirbridge: %s", _describe(exc))
        if getattr(server, "pidfile", None) is not None:
            server.pidfile.unlink()
        raise SystemExit(2) from None
    if warning:
        print(warning, file=sys.stderr, flush=True)
        server.log.warning(
            "fhirbridge: authentication is off: every caller gets every scope (loopback only)"
        )


def child_exit(server: Any, worker: Any) -> None:
    """gunicorn hook: a dead worker's live gauges leave /metrics (its counters stay)."""
    from fhirbridge.metrics import child_exit as drop_worker

    drop_worker(server, worker)


def _describe(exc: Exception) -> str:
    """The error without setting values (a bad FHIRBRIDGE_* value may be a secret)."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        fields = sorted({str(e["loc"][0]).upper() for e in exc.errors() if e["loc"]})
        return "invalid settings: " + ", ".join(f"FHIRBRIDGE_{f}" for f in fields)
    return str(exc)
