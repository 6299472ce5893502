"""The /ui pages: sign-in, the console, one submission's deliveries, dead-letter replay.

Server-rendered HTML, no script. Reads go through the same Outbox queries as /api/v1/sync
(status_body, deliveries, replay); every form POST carries the session's CSRF token and ends
in a redirect with a flash message (POST-redirect-GET). Pages show identifiers, times,
statuses, counts and the PHI-free error summaries the worker records, never clinical values.
"""

from __future__ import annotations

import functools
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from flask import (
    Blueprint,
    Response,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    url_for,
)
from werkzeug.wrappers import Response as BaseResponse

from fhirbridge.api.access import SYNC_ADMIN, Principal, current_principal, public, requires
from fhirbridge.api.http import fhir_response, services
from fhirbridge.api.sync import TARGETS_EXTENSION, status_body
from fhirbridge.auth import authenticator
from fhirbridge.errors import NotFoundError, UnauthorizedError
from fhirbridge.ui import queries
from fhirbridge.ui.session import CSRF_FIELD, check_csrf, csrf_token, sign_in, sign_out

log = logging.getLogger(__name__)

STATIC_DIR: Final = Path(__file__).resolve().parent / "static"
DEAD_LETTERS_SHOWN: Final = 50
RECENT_SUBMISSIONS: Final = 20

bp = Blueprint("ui", __name__, url_prefix="/ui", template_folder="templates")

SECURITY_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}


@bp.after_request
def _security_headers(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    return response


@bp.errorhandler(UnauthorizedError)
def _to_sign_in(err: UnauthorizedError) -> BaseResponse:
    """A browser without a (valid) session is sent to the sign-in form; API clients get 401."""
    sent_credentials = "Authorization" in request.headers or "X-API-Key" in request.headers
    if request.method == "GET" and not sent_credentials:
        return redirect(url_for("ui.login_form"), code=303)
    return fhir_response(err.outcome(), err.http_status, dict(err.headers))


@bp.app_template_filter("ui_time")
def _when(value: datetime | str | None) -> str:
    """An instant as `2026-03-02 14:32:05 UTC` (ISO strings from status_body, or datetimes)."""
    if value is None:
        return "never"
    at = datetime.fromisoformat(value) if isinstance(value, str) else value
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@bp.context_processor
def _globals() -> dict[str, Any]:
    return {"csrf_token": csrf_token, "csrf_field": CSRF_FIELD}


def _now() -> datetime:
    return datetime.now(UTC)


def _configured() -> dict[str, dict[str, Any]]:
    targets: dict[str, dict[str, Any]] = current_app.extensions.get(TARGETS_EXTENSION, {})
    return targets


def _known(target: str) -> str:
    if target not in _configured():
        raise NotFoundError("no configured target with this name")
    return target


def _auth_on() -> bool:
    """False in the loopback no-auth mode, where every caller may use the console."""
    return authenticator(current_app).enabled


def _check_key(key: str) -> Principal | None:
    return authenticator(current_app).api_key(key)


def _back_to_console(anchor: str = "") -> BaseResponse:
    return redirect(url_for("ui.console") + anchor, code=303)


# --------------------------------------------------------------------------- sign-in


@bp.get("/login")
@public
def login_form() -> str:
    """The sign-in form (paste an API key with sync.admin)."""
    return render_template("ui/login.html", auth_on=_auth_on())


@bp.post("/login")
@public
def login() -> BaseResponse | tuple[str, int]:
    """Check the pasted key; a session for a key with sync.admin, else the form again."""
    check_csrf(request.form)
    key = request.form.get("api_key", "").strip()
    principal = _check_key(key) if key else None
    if principal is None:
        log.warning("console sign-in refused: unknown key")
        return render_template(
            "ui/login.html", auth_on=_auth_on(), error="This key is not accepted."
        ), 401
    if not principal.may(SYNC_ADMIN):
        log.warning("console sign-in refused: client %s lacks sync.admin", principal.client_id)
        return render_template(
            "ui/login.html",
            auth_on=_auth_on(),
            error="This key may not use the console: it needs the sync.admin scope.",
        ), 403
    sign_in(principal, key)
    log.info("console sign-in: client %s", principal.client_id)
    flash(f"Signed in as {principal.client_id}.")
    return _back_to_console()


@bp.post("/logout")
@public
def logout() -> BaseResponse:
    """End the console session."""
    check_csrf(request.form)
    sign_out()
    return redirect(url_for("ui.login_form"), code=303)


@bp.get("/console.css")
@public
def stylesheet() -> Response:
    """The console's only asset (no build step, no CDN)."""
    return Response(_stylesheet(), mimetype="text/css")


@functools.cache
def _stylesheet() -> bytes:
    return (STATIC_DIR / "console.css").read_bytes()


# --------------------------------------------------------------------------- console


@bp.get("")
@requires(SYNC_ADMIN)
def console() -> str:
    """Per target: queue, failures, dead letters with replay, health; recent submissions."""
    svc = services()
    configured = _configured()
    now = _now()
    status = status_body(svc.outbox, configured, now)
    dead = {
        t["name"]: svc.outbox.deliveries(target=t["name"], status="dead", limit=DEAD_LETTERS_SHOWN)
        for t in status["targets"]
    }
    recent = queries.recent_submissions(
        svc.store, svc.outbox, list(configured), limit=RECENT_SUBMISSIONS
    )
    return render_template(
        "ui/console.html",
        status=status,
        dead=dead,
        dead_shown=DEAD_LETTERS_SHOWN,
        recent=recent,
        targets=list(configured),
        principal=current_principal(),
        auth_on=_auth_on(),
    )


@bp.get("/submissions/<submission_id>")
@requires(SYNC_ADMIN)
def submission(submission_id: str) -> str:
    """Where the delivery of every resource one submission produced stands, per target."""
    svc = services()
    found = queries.submission(svc.store, svc.outbox, list(_configured()), submission_id)
    if found is None:
        raise NotFoundError("no submission with this id")
    return render_template(
        "ui/submission.html",
        sub=found,
        targets=list(_configured()),
        principal=current_principal(),
        auth_on=_auth_on(),
    )


@bp.post("/targets/<target>/dead-letters/replay")
@requires(SYNC_ADMIN)
def replay_all(target: str) -> BaseResponse:
    """Queue every dead letter of the target again, then back to the console."""
    check_csrf(request.form)
    count = services().outbox.replay(_known(target), None, now=_now())
    log.info(
        "console replay: client %s, target %s, %d dead letters",
        current_principal().client_id,
        target,
        count,
    )
    flash(f"{target}: {count} dead letter{'' if count == 1 else 's'} queued again.")
    return _back_to_console(f"#target-{target}")


@bp.post("/targets/<target>/dead-letters/<resource_type>/<resource_id>/replay")
@requires(SYNC_ADMIN)
def replay_one(target: str, resource_type: str, resource_id: str) -> BaseResponse:
    """Queue one dead letter again, then back to the console."""
    check_csrf(request.form)
    count = services().outbox.replay(_known(target), [(resource_type, resource_id)], now=_now())
    log.info(
        "console replay: client %s, target %s, %s/%s: %d",
        current_principal().client_id,
        target,
        resource_type,
        resource_id,
        count,
    )
    if count:
        flash(f"{target}: {resource_type}/{resource_id} queued again.")
    else:
        flash(f"{target}: that resource is not a dead letter (any more).")
    return _back_to_console(f"#target-{target}")
