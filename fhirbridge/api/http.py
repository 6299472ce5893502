"""Small HTTP helpers shared by the blueprints: FHIR JSON responses and the service registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from flask import Response, current_app

if TYPE_CHECKING:
    from fhirbridge.fhir.validate import OutputValidator
    from fhirbridge.mapping.pack import MappingPack
    from fhirbridge.settings import Settings
    from fhirbridge.store.resources import ResourceStore
    from fhirbridge.sync.outbox import Outbox
    from fhirbridge.validation import SubmissionValidator

FHIR_JSON = "application/fhir+json"


@dataclass(frozen=True)
class Services:
    """Everything a request handler needs, built once by create_app."""

    settings: Settings
    pack: MappingPack
    input_validator: SubmissionValidator
    output_validator: OutputValidator
    store: ResourceStore
    outbox: Outbox


def services() -> Services:
    svc: Services = current_app.extensions["fhirbridge"]
    return svc


def json_response(
    body: Any,
    status: int = 200,
    *,
    mimetype: str = "application/json",
    headers: dict[str, str] | None = None,
) -> Response:
    """Serialize with orjson (the same bytes json would give, several times faster)."""
    resp = Response(orjson.dumps(body), status=status, mimetype=mimetype)
    if headers:
        resp.headers.update(headers)
    return resp


def fhir_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return json_response(body, status, mimetype=FHIR_JSON, headers=headers)
