"""FHIR ``$validate`` over HTTP: any R4 resource or Bundle in, an OperationOutcome out.

    POST /fhir/$validate           body: a resource, a Bundle, or a Parameters
    POST /fhir/{type}/$validate    the same; the resource must be a {type}

The checks are :func:`fhirbridge.fhir.checker.check_document`'s: R4B models, the official R4
JSON Schema, the R4 vital-signs profiles; Bundle entries are located as
``Bundle.entry[3].resource.status``.

Semantics follow the R4 operation http://hl7.org/fhir/OperationDefinition/Resource-validate:
  * the answer is 200 with an OperationOutcome whether or not the resource is valid (a single
    ``information`` issue "no issues" when it is); a 4xx means validation could not be done:
    400 malformed JSON or a bad operation parameter, 415 a non-JSON content type;
  * the input is the body itself, or a ``Parameters`` resource whose ``resource`` parameter
    holds it, with the optional ``mode`` (create | update | profile; ``delete`` is not
    supported here) and ``profile`` parameters; with a non-Parameters body, ``mode`` and
    ``profile`` may be given as query parameters, as FHIR allows for primitive parameters;
  * a nominated ``profile`` that the server cannot validate against is an error (400): the
    supported ones are the R4 vital-signs profiles and the base StructureDefinition of the
    resource's own type.
The R4 operation is defined at type and instance level; the system-level ``/fhir/$validate``
is a convenience for clients that do not know the type up front (Bundles, NDJSON lines).
"""

from __future__ import annotations

import re
from typing import Any, Final

from flask import Blueprint, Flask, Response, request

from fhirbridge.api.access import SUBMISSIONS_WRITE, requires
from fhirbridge.api.body import read_json_body
from fhirbridge.api.http import fhir_response, services
from fhirbridge.errors import BadRequestError, Issue, NotFoundError, operation_outcome
from fhirbridge.fhir.checker import check_document
from fhirbridge.fhir.profiles import PROFILE_BASE, VITAL_SIGNS_PROFILES

__all__ = ["bp", "init_app"]

bp = Blueprint("validate", __name__, url_prefix="/fhir")

_MODES: Final = frozenset({"create", "update", "delete", "profile"})
# the shape of a FHIR resource type name; anything else in the URL cannot be a type
_TYPE_NAME = re.compile(r"[A-Z][A-Za-z]{1,63}")
# `profile` is a uri in R4's definition; clients also send it as canonical or string
_PROFILE_KEYS: Final = ("valueUri", "valueCanonical", "valueUrl", "valueString")


@bp.post("/$validate")
@requires(SUBMISSIONS_WRITE)
def validate_any() -> Response:
    """Validate whatever resource the body holds (or the Parameters' ``resource``)."""
    return _validate(None)


@bp.post("/<rtype>/$validate")
@requires(SUBMISSIONS_WRITE)
def validate_type(rtype: str) -> Response:
    """Validate a resource that must be of type ``rtype``."""
    if _TYPE_NAME.fullmatch(rtype) is None:
        raise NotFoundError("not a FHIR resource type")
    return _validate(rtype)


def _validate(rtype: str | None) -> Response:
    resource, mode, profile = _operation_input(read_json_body())
    if mode is not None and mode not in _MODES:
        raise BadRequestError(
            "bad mode", [Issue("mode must be one of: create, update, delete, profile")]
        )
    if mode == "delete":
        raise BadRequestError(
            "mode delete is not supported",
            [Issue("mode delete is not supported by this server", code="not-supported")],
        )
    actual = resource.get("resourceType") if isinstance(resource, dict) else None
    nominated = _nominated(profile, actual)
    issues: list[Issue] = []
    if rtype is not None and actual != rtype:
        issues.append(
            Issue(
                f"must be {rtype}: the resource posted to /{rtype}/$validate is of another type",
                ("Resource.resourceType",),
                "invalid",
            )
        )
    issues += check_document(resource, validator=services().output_validator, nominated=nominated)
    if not issues:
        issues = [Issue("no issues", code="informational", severity="information")]
    return fhir_response(operation_outcome(issues))


def _operation_input(body: Any) -> tuple[Any, str | None, str | None]:
    """(resource, mode, profile) from a Parameters body, or from the body and query string."""
    if not (isinstance(body, dict) and body.get("resourceType") == "Parameters"):
        return body, request.args.get("mode"), request.args.get("profile")
    resource: Any = None
    mode: str | None = None
    profile: str | None = None
    parameters = body.get("parameter")
    for parameter in parameters if isinstance(parameters, list) else []:
        if not isinstance(parameter, dict):
            continue
        name = parameter.get("name")
        if name == "resource":
            resource = parameter.get("resource")
        elif name == "mode":
            mode = _text(parameter.get("valueCode"))
        elif name == "profile":
            profile = next((_text(parameter[k]) for k in _PROFILE_KEYS if k in parameter), None)
    if resource is None:
        # a Parameters body is the operation's input; to validate a Parameters resource
        # itself, send it as the `resource` parameter
        raise BadRequestError(
            "no resource to validate",
            [
                Issue(
                    "Parameters has no `resource` parameter", ("Parameters.parameter",), "required"
                )
            ],
        )
    return resource, mode, profile


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _nominated(profile: str | None, resource_type: Any) -> list[str]:
    """The vital-signs profiles to apply for ``profile``; 400 for one we cannot check."""
    if profile is None:
        return []
    url = profile.split("|", 1)[0]
    if url in VITAL_SIGNS_PROFILES:
        return [url]
    if isinstance(resource_type, str) and url == PROFILE_BASE + resource_type:
        return []  # the base definition: what every validation checks anyway
    raise BadRequestError(
        "unsupported profile",
        [
            Issue(
                "this server cannot validate against the nominated profile; supported: the "
                "R4 vital-signs profiles and the base definition of the resource's type",
                code="not-supported",
            )
        ],
    )


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
