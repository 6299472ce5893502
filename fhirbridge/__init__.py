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
    from fhirbridge.api import docs as docs_api
    from fhirbridge.api import fhir, health, problems, submissions, terminology, validate
    from fhirbridge.api import sync as sync_api
    from fhirbridge.api.http import Services
    from fhirbridge.fhir.validate import OutputValidator
    from fhirbridge.mapping.pack import load_pack
    from fhirbridge.store.resources import ResourceStore
    from fhirbridge.sync.outbox import Outbox
    from fhirbridge.sync.runtime import routes
    from fhirbridge.sync.targets import load_targets
    from fhirbridge.validation import SubmissionValidator

    settings = settings or Settings()
    pack = load_pack(settings.mappings_dir)
    targets = load_targets(settings.targets) if settings.targets else []
    store = ResourceStore.from_url(settings.database_url)
    store.create_schema()

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["fhirbridge"] = Services(
        settings=settings,
        pack=pack,
        input_validator=SubmissionValidator(pack.source_schema, pack.integrity),
        output_validator=OutputValidator(),
        store=store,
        outbox=Outbox(store, routes(targets)),
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
    app.extensions.setdefault(fhir.CAPABILITY_EXTENSIONS, []).append(
        terminology.conceptmap_capability()
    )
    return app


def _publish_jwks(app: Flask, settings: Settings, targets: list[Any]) -> None:
    """Serve the public keys of every SMART Backend Services target at settings.jwks_path."""
    from fhirbridge.api import jwks as jwks_api
    from fhirbridge.ehr.auth import SmartBackendConfig, jwks, parse_auth_config

    configs = [parse_auth_config(t.auth) for t in targets]
    keys = jwks(c for c in configs if isinstance(c, SmartBackendConfig))
    app.register_blueprint(jwks_api.make_blueprint(settings.jwks_path, lambda: keys))
