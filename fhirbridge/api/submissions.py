"""POST /api/v1/submissions and /api/v1/$transform: parse → pipeline → (store) → respond."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Flask, Response, request
from sqlalchemy import Connection

from fhirbridge import audit
from fhirbridge.api.access import SUBMISSIONS_WRITE, requires
from fhirbridge.api.body import read_json_body
from fhirbridge.api.http import fhir_response, json_response, services
from fhirbridge.api.metrics import counts_submission
from fhirbridge.api.sync import delivery_view
from fhirbridge.errors import BadRequestError, NotFoundError
from fhirbridge.fhir.bundle import transaction_bundle
from fhirbridge.pipeline import summary, transform
from fhirbridge.store.resources import SaveResult

bp = Blueprint("submissions", __name__, url_prefix="/api/v1")


def _flag(name: str) -> bool:
    return request.args.get(name, "").lower() in ("1", "true", "yes")


def _return_bundle() -> bool:
    value = request.args.get("return")
    if value not in (None, "summary", "bundle"):
        raise BadRequestError("the `return` parameter must be summary or bundle")
    return value == "bundle"


def _patient_ref(resources: list[dict[str, Any]]) -> str:
    for resource in resources:
        if resource["resourceType"] == "Patient":
            return f"Patient/{resource['id']}"
    return ""


def _now() -> datetime:
    return datetime.now(UTC)


@bp.post("/submissions")
@requires(SUBMISSIONS_WRITE)
@audit.audited("create", "C")  # accepted: written by on_saved below; refused: by the hook
@counts_submission
def create_submission() -> Response:
    """Validate, map, validate output, store; 201 when anything changed, 200 when nothing did."""
    document = read_json_body()
    as_bundle = _return_bundle()
    svc = services()
    now = _now()
    result = transform(
        document,
        pack=svc.pack,
        input_validator=svc.input_validator,
        output_validator=svc.output_validator,
        now=now,
    )
    body = summary(result)

    def on_saved(conn: Connection, saved: SaveResult) -> None:
        # Queued for every configured target, and audited, in the same transaction as the
        # resources.
        svc.outbox.enqueue(conn, saved, patient_ref=_patient_ref(result.resources), now=now)
        audit.record_submission(conn, saved, now=now)

    saved = svc.store.save_submission(
        submission_id=result.submission_id,
        source=result.source,
        patient_id=result.patient_id or "",
        content_hash=result.content_hash,
        resources=result.resources,
        summary=body,
        now=now,
        on_saved=on_saved,
    )
    status = 201 if saved.changed else 200
    headers = {"Location": f"{request.root_path}/api/v1/submissions/{result.submission_id}"}
    if as_bundle:
        return fhir_response(transaction_bundle(saved.stored_resources), status, headers)
    body["outcome"] = "accepted" if saved.changed else "unchanged"
    body["resources"] = [
        {
            "resourceType": r.resource_type,
            "id": r.id,
            "versionId": r.version_id,
            "outcome": r.outcome,
        }
        for r in saved.resources
    ]
    return json_response(body, status, headers=headers)


@bp.get("/submissions/<submission_id>")
@requires(SUBMISSIONS_WRITE)
@audit.audited("read", "R")
def get_submission(submission_id: str) -> Response:
    """The stored summary of an accepted submission."""
    found = services().store.get_submission(submission_id)
    if found is None:
        raise NotFoundError("no submission with this id")
    produced = _produced(found["summary"])
    audit.note((audit.Ref(t, i) for t, i in produced), submission_id=found["id"])
    received = found["received_at"]
    return json_response(
        {
            "submissionId": found["id"],
            "source": found["source"],
            "receivedAt": received.isoformat() if isinstance(received, datetime) else received,
            "summary": found["summary"],
            # Per target, where each resource the submission produced stands (its latest version).
            "delivery": delivery_view(produced),
        }
    )


def _produced(stored_summary: Any) -> list[tuple[str, str]]:
    """(type, id) of every resource in the stored summary's records[].produced, in order."""
    keys: dict[tuple[str, str], None] = {}  # ordered, without repeats
    records = stored_summary.get("records") if isinstance(stored_summary, dict) else None
    for record in records if isinstance(records, list) else []:
        produced = record.get("produced") if isinstance(record, dict) else None
        for ref in produced if isinstance(produced, list) else []:
            if isinstance(ref, dict) and ref.get("resourceType") and ref.get("id"):
                keys[(str(ref["resourceType"]), str(ref["id"]))] = None
    return list(keys)


@bp.post("/$transform")
@requires(SUBMISSIONS_WRITE)
@audit.audited("operation", "E")
def transform_only() -> Response:
    """Same input as /submissions; nothing stored. `?trace=true` adds the rule of every element."""
    document = read_json_body()
    svc = services()
    trace = _flag("trace")
    result = transform(
        document,
        pack=svc.pack,
        input_validator=svc.input_validator,
        output_validator=svc.output_validator,
        now=_now(),
        trace=trace,
    )
    bundle = transaction_bundle(result.resources)
    if not trace:
        return fhir_response(bundle)
    return json_response({"bundle": bundle, "trace": result.trace, **_unmapped(result)})


def _unmapped(result: Any) -> dict[str, Any]:
    extra = summary(result)
    return {"unmappedTerms": extra["unmappedTerms"]} if "unmappedTerms" in extra else {}


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
