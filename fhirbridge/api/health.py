"""/healthz (the process is up) and /readyz (database reachable and at the latest migration,
mappings loaded)."""

from __future__ import annotations

from flask import Blueprint, Flask, Response

from fhirbridge.api.access import public
from fhirbridge.api.http import json_response, services
from fhirbridge.db import at_head

bp = Blueprint("health", __name__)


@bp.get("/healthz")
@public
def healthz() -> Response:
    return json_response({"status": "ok"})


@bp.get("/readyz")
@public
def readyz() -> Response:
    svc = services()
    checks = {
        "database": svc.store.ping(),
        "mappings": bool(svc.pack.rules),
        # Another instance may have been upgraded and migrated the shared database past us.
        "migrations": at_head(svc.store),
    }
    ready = all(checks.values())
    return json_response(
        {"status": "ready" if ready else "not ready", "checks": checks}, 200 if ready else 503
    )


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
