"""fhirbridge: MDMA-assisted psychotherapy records in, validated FHIR R4 out.

`create_app(settings)` is wiring only: load and compile the mapping pack, build the validators,
open the store, register the blueprints.
"""

from __future__ import annotations

from flask import Flask

from fhirbridge.settings import Settings

__all__ = ["Settings", "create_app"]


def create_app(settings: Settings | None = None) -> Flask:
    """Application factory (gunicorn: ``fhirbridge:create_app()``)."""
    from fhirbridge.api import fhir, health, problems, submissions, terminology, validate
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
    problems.init_app(app)
    health.init_app(app)
    submissions.init_app(app)
    fhir.init_app(app)
    terminology.init_app(app)
    validate.init_app(app)
    app.extensions.setdefault(fhir.CAPABILITY_EXTENSIONS, []).append(
        terminology.conceptmap_capability()
    )
    return app
