"""The only place errors become HTTP: FhirbridgeError and werkzeug errors → OperationOutcome."""

from __future__ import annotations

import logging

from flask import Flask, Response
from werkzeug.exceptions import HTTPException

from fhirbridge.api.http import fhir_response
from fhirbridge.errors import FhirbridgeError, Issue, operation_outcome

log = logging.getLogger(__name__)

# FHIR issue-type codes for the HTTP errors werkzeug raises itself (routing, methods, size).
_HTTP_ISSUE_CODES = {
    400: "invalid",
    404: "not-found",
    405: "not-supported",
    406: "not-supported",
    413: "too-long",
    415: "not-supported",
    429: "throttled",
}


def _fhir_error(err: FhirbridgeError) -> Response:
    if err.http_status >= 500:
        log.error("internal error", extra={"error_code": err.code})
    return fhir_response(err.outcome(), err.http_status, dict(err.headers) or None)


def _http_error(err: HTTPException) -> Response:
    status = err.code or 500
    issue = Issue(
        err.description or err.name,
        code=_HTTP_ISSUE_CODES.get(status, "exception" if status >= 500 else "invalid"),
    )
    resp = fhir_response(operation_outcome([issue]), status)
    # Allow (405) and Retry-After (429, 503: werkzeug's retry_after, or the response that
    # Flask-Limiter's on_breach hook puts in RateLimitExceeded) tell the client what to do next.
    carried = err.get_response().headers
    for name in ("Allow", "Retry-After"):
        if carried.get(name):
            resp.headers[name] = carried[name]
    return resp


def _unexpected(err: Exception) -> Response:
    # The exception text may quote input: log only its type, never its message.
    log.exception("unhandled %s", type(err).__name__, exc_info=False)
    return fhir_response(
        operation_outcome([Issue("internal error", code="exception", severity="fatal")]), 500
    )


def init_app(app: Flask) -> None:
    app.register_error_handler(FhirbridgeError, _fhir_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)
