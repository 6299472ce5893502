"""GET /metrics (Prometheus text format, sync.admin) and the hooks that count HTTP requests.

Every request is timed from the first before_request hook to the last after_request hook and
counted under its URL rule template (``/fhir/<rtype>/<rid>``), never its concrete path: a
path can hold patient ids, and one series per id would swamp Prometheus. A request that no
rule matched is counted as ``<unmatched>``; one whose exception escaped every handler is
counted as 500 at teardown. `counts_submission` wraps the submissions view.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, Final, TypeVar, cast

from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from werkzeug.exceptions import HTTPException

from fhirbridge.api.access import SYNC_ADMIN, requires
from fhirbridge.api.http import Services
from fhirbridge.errors import FhirbridgeError
from fhirbridge.metrics import AppMetrics, SyncCollector, build_metrics

#: app.extensions key of the app's AppMetrics.
METRICS_EXTENSION: Final = "fhirbridge.metrics"
_STARTED: Final = "fhirbridge_metrics_started"
_COUNTED: Final = "fhirbridge_metrics_counted"

F = TypeVar("F", bound=Callable[..., Any])

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
@requires(SYNC_ADMIN)
def metrics() -> Response:
    """Every metric of this app (of every process with PROMETHEUS_MULTIPROC_DIR)."""
    return Response(generate_latest(_app_metrics().registry), content_type=CONTENT_TYPE_LATEST)


def _app_metrics() -> AppMetrics:
    found: AppMetrics = current_app.extensions[METRICS_EXTENSION]
    return found


def _start() -> None:
    g.setdefault(_STARTED, time.perf_counter())


def _finish(response: Response) -> Response:
    _count(response.status_code)
    return response


def _teardown(exc: BaseException | None) -> None:
    if not g.get(_COUNTED, False):  # no after_request ran: an exception escaped
        _count(500)


def _count(status: int) -> None:
    started: float | None = g.get(_STARTED)
    elapsed = None if started is None else time.perf_counter() - started
    rule = request.url_rule
    _app_metrics().observe_request(rule.rule if rule else None, request.method, status, elapsed)
    setattr(g, _COUNTED, True)


def counts_submission(view: F) -> F:
    """Count a submission view's outcome: 201 created, 200 unchanged, a refusal rejected.

    Rejections also count their mapping and validation errors by rule. A caller without the
    scope never reaches the view (the authentication hook refuses it first): not counted.
    """

    @functools.wraps(view)
    def counted(*args: Any, **kwargs: Any) -> Any:
        found: AppMetrics | None = current_app.extensions.get(METRICS_EXTENSION)
        try:
            response = view(*args, **kwargs)
        except (FhirbridgeError, HTTPException) as exc:
            if found is not None and _refuses(exc):
                found.count_rejection(exc)
            raise
        if found is not None:
            found.count_submission("created" if response.status_code == 201 else "unchanged")
        return response

    return cast(F, counted)


def _refuses(exc: FhirbridgeError | HTTPException) -> bool:
    """A 4xx: the request was refused (a 5xx is our failure, not a rejected submission)."""
    status = exc.http_status if isinstance(exc, FhirbridgeError) else (exc.code or 500)
    return 400 <= status < 500


def init_app(app: Flask) -> None:
    """Build the app's metrics, time every request, serve /metrics.

    Call it after the other init_app calls: its before_request hook goes first in the list
    and its after_request hook last in the order Flask runs them, so the time covers the
    other hooks (authentication, rate limiting) and the status is the one sent.
    """
    svc: Services = app.extensions["fhirbridge"]
    sync = SyncCollector(svc.store.engine, [r.target for r in svc.outbox.routes])
    app.extensions[METRICS_EXTENSION] = build_metrics(sync, (r.name for r in svc.pack.rules))
    app.before_request_funcs.setdefault(None, []).insert(0, _start)
    app.after_request_funcs.setdefault(None, []).insert(0, _finish)
    app.teardown_request(_teardown)
    app.register_blueprint(bp)
