"""fhirbridge: MDMA-assisted psychotherapy records in, validated FHIR R4 out.

`create_app(settings)` is wiring only: load and compile the mapping pack, build the validators,
open the store, register the blueprints.
"""

from __future__ import annotations

from typing import Any

from flask import Flask

from fhirbridge.settings import Settings

__all__ = ["Settings", "create_app"]


def create_app(settings: Settings | None = None) -> Flask:
    """Application factory (gunicorn: ``fhirbridge:create_app()``)."""
    from fhirbridge import audit, ui
    from fhirbridge.api import docs as docs_api
    from fhirbridge.api import fhir, health, problems, ratelimit, submissions, terminology, validate
    from fhirbridge.api import metrics as metrics_api
    from fhirbridge.api import sync as sync_api
    from fhirbridge.api.http import Services
    from fhirbridge.auth import init_app as init_auth
    from fhirbridge.db import ensure_current
    from fhirbridge.fhir.validate import OutputValidator
    from fhirbridge.logs import init_app as init_logs
    from fhirbridge.mapping.pack import load_pack
    from fhirbridge.store.resources import ResourceStore
    from fhirbridge.sync.outbox import Outbox, Route
    from fhirbridge.validation import SubmissionValidator

    settings = settings or Settings()
    pack = load_pack(settings.mappings_dir)
    targets: list[Any] = []
    sync_routes: list[Route] = []
    if settings.targets:  # the sync modules (requests, PyJWT, ...): ~0.1 s of start-up, issue 6
        from fhirbridge.sync.runtime import routes
        from fhirbridge.sync.targets import load_targets

        targets = load_targets(settings.targets)
        sync_routes = routes(targets)
    store = ResourceStore.from_url(settings.database_url)
    try:  # refuse a database behind this version's migrations (SchemaNotCurrentError)
        ensure_current(store, auto_upgrade=settings.db_auto_upgrade)
    except BaseException:
        store.close()
        raise

    app = Flask(__name__, static_folder=None)  # no /static route: nothing to serve
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    # The first before_request hook: every later hook and view sees the authenticated caller.
    init_auth(app, settings)
    app.extensions["fhirbridge"] = Services(
        settings=settings,
        pack=pack,
        input_validator=SubmissionValidator(pack.source_schema, pack.integrity),
        output_validator=OutputValidator(),
        store=store,
        outbox=Outbox(store, sync_routes),
    )
    _publish_jwks(app, settings, targets)
    problems.init_app(app)
    health.init_app(app)
    submissions.init_app(app)
    fhir.init_app(app)
    terminology.init_app(app)
    validate.init_app(app)
    docs_api.init_app(app)
    sync_api.init_app(app, targets)
    # One AuditEvent per submission, FHIR read and search, after its response is computed.
    audit.init_app(app)
    ui.init_app(app, settings)
    app.extensions.setdefault(fhir.CAPABILITY_EXTENSIONS, []).append(
        terminology.conceptmap_capability()
    )
    # After the auth hook (the limit is per authenticated client) and every blueprint.
    ratelimit.init_app(app, settings)
    # Last: its timing hooks wrap every other hook (see fhirbridge/api/metrics.py).
    metrics_api.init_app(app)
    # After metrics: the request id is set before every other hook (auth's refusals carry it)
    # and the access line is written after every other after_request hook.
    init_logs(app, settings)
    return app


def _publish_jwks(app: Flask, settings: Settings, targets: list[Any]) -> None:
    """Serve the public keys of every SMART Backend Services target at settings.jwks_path."""
    from fhirbridge.api import jwks as jwks_api

    keys: dict[str, Any] = {"keys": []}
    if targets:
        from fhirbridge.ehr.auth import SmartBackendConfig, jwks, parse_auth_config

        configs = [parse_auth_config(t.auth) for t in targets]
        keys = jwks(c for c in configs if isinstance(c, SmartBackendConfig))
    app.register_blueprint(jwks_api.make_blueprint(settings.jwks_path, lambda: keys))
