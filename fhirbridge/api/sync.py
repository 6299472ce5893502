"""/api/v1/sync: where delivery to the hospital FHIR servers stands, and dead-letter replay.

Everything here reads or requeues outbox rows; nothing sends. Answers name targets, resource
types, our ids, statuses and ``last_error`` (error codes and an OperationOutcome summary, built
PHI-free by the worker); a target appears as ``Target.summary()`` (auth: its type only).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Flask, Response, current_app, request

from fhirbridge.api.access import SYNC_ADMIN, requires
from fhirbridge.api.http import json_response, services
from fhirbridge.errors import BadRequestError, NotFoundError
from fhirbridge.sync.outbox import Outbox

if TYPE_CHECKING:
    from fhirbridge.sync.targets import Target

bp = Blueprint("sync", __name__, url_prefix="/api/v1/sync")

#: app.extensions key: the configured targets' summaries (name → Target.summary()).
TARGETS_EXTENSION = "fhirbridge.sync.targets"
MAX_LIMIT = 500

# outbox status → the key the status answer uses for its count
STATUS_KEYS = {
    "queued": "queued",
    "in_flight": "inFlight",
    "sent": "sent",
    "retrying": "failed",
    "dead": "deadLettered",
    "waiting": "waiting",
    "fallback": "fallback",
    "skipped": "skipped",
}


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _configured() -> dict[str, dict[str, Any]]:
    targets: dict[str, dict[str, Any]] = current_app.extensions.get(TARGETS_EXTENSION, {})
    return targets


def _known(target: str) -> str:
    if target not in _configured():
        raise NotFoundError("no configured target with this name")
    return target


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequestError(f"the `{name}` parameter must be an integer") from None
    if not low <= value <= high:
        raise BadRequestError(f"the `{name}` parameter must be between {low} and {high}")
    return value


def status_body(
    outbox: Outbox | None, configured: Mapping[str, dict[str, Any]], now: datetime
) -> dict[str, Any]:
    """The /sync/status answer (also ``fhirbridge sync status --json``).

    ``configured``: target name → ``Target.summary()``, in the targets file's order; targets
    that still have rows but are no longer configured follow, with ``configured: false``.
    ``outbox`` None: no ledger yet (every count zero).
    """
    counts = outbox.summary(now) if outbox is not None else {}
    activity = outbox.activity() if outbox is not None else {}
    names = list(configured) + sorted(set(counts) - set(configured))
    out = []
    for name in names:
        config = configured.get(name)
        entry: dict[str, Any] = {
            "name": name,
            "configured": config is not None,
            "baseUrl": None if config is None else config["base_url"],
            "profile": None if config is None else config["profile"],
        }
        summary = counts.get(name, {})
        for status_name, key in STATUS_KEYS.items():
            entry[key] = int(summary.get(status_name, 0))
        entry["oldestWaitingSeconds"] = summary.get("oldestWaitingSeconds")
        seen = activity.get(name, {})
        entry["lastSuccessAt"] = _iso(seen.get("lastSuccessAt"))
        error = seen.get("lastError")
        entry["lastError"] = None if error is None else {**error, "at": _iso(error["at"])}
        entry["target"] = config
        out.append(entry)
    return {"generatedAt": now.isoformat(), "targets": out}


@bp.get("/status")
@requires(SYNC_ADMIN)
def status() -> Response:
    """Per target: counts by delivery state, the oldest waiting row, last success and error."""
    return json_response(status_body(services().outbox, _configured(), _now()))


@bp.get("/dead-letters")
@requires(SYNC_ADMIN)
def dead_letters() -> Response:
    """Dead-lettered deliveries, newest first (``?target=``, ``limit``, ``offset``)."""
    target = request.args.get("target")
    if target is not None:
        _known(target)
    limit = _int_arg("limit", 100, 1, MAX_LIMIT)
    offset = _int_arg("offset", 0, 0, 10**9)
    outbox = services().outbox
    counts = outbox.summary(_now())
    total = sum(
        int(c.get("dead", 0)) for name, c in counts.items() if target is None or name == target
    )
    rows = outbox.deliveries(target=target, status="dead", limit=limit, offset=offset)
    return json_response(
        {
            "target": target,
            "total": total,
            "limit": limit,
            "offset": offset,
            "deadLetters": [d.to_dict() for d in rows],
        }
    )


@bp.get("/dead-letters/<target>/<resource_type>/<resource_id>")
@requires(SYNC_ADMIN)
def dead_letter(target: str, resource_type: str, resource_id: str) -> Response:
    """One dead letter; 404 when that delivery is not dead-lettered."""
    key = (resource_type, resource_id)
    found = services().outbox.ledger(_known(target), [key]).get(key)
    if found is None or found.status != "dead":
        raise NotFoundError("no dead letter for this target and resource")
    return json_response(found.to_dict())


@bp.post("/dead-letters/<target>/replay")
@requires(SYNC_ADMIN)
def replay_all(target: str) -> Response:
    """Queue every dead letter of the target again (attempts start from zero)."""
    count = services().outbox.replay(_known(target), None, now=_now())
    return json_response({"target": target, "replayed": count})


@bp.post("/dead-letters/<target>/<resource_type>/<resource_id>/replay")
@requires(SYNC_ADMIN)
def replay_one(target: str, resource_type: str, resource_id: str) -> Response:
    """Queue one dead letter again; 404 when that delivery is not dead-lettered."""
    count = services().outbox.replay(_known(target), [(resource_type, resource_id)], now=_now())
    if not count:
        raise NotFoundError("no dead letter for this target and resource")
    return json_response({"target": target, "replayed": count})


def delivery_view(produced: list[tuple[str, str]]) -> dict[str, list[dict[str, Any]]]:
    """Per configured target, where the delivery of each of these resources stands."""
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in _configured()}
    for d in services().outbox.for_resources(produced):
        row = d.to_dict()
        del row["target"]
        out.setdefault(d.target, []).append(row)
    return out


def init_app(app: Flask, targets: Sequence[Target]) -> None:
    """Register the blueprint; `targets` are the ones create_app loaded (read once)."""
    app.extensions[TARGETS_EXTENSION] = {t.name: t.summary() for t in targets}
    app.register_blueprint(bp)
