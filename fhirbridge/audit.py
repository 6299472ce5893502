"""The audit trail: one FHIR R4 AuditEvent per submission, FHIR read or search, sync delivery.

Who (the client id), what (the resources touched), when (`recorded`) and the outcome, stored as
AuditEvent resources in the ResourceStore's own tables, so `/fhir/AuditEvent` reads, searches
and `_history` work like any other type (sync.admin only: fhirbridge.api.fhir.AUDIT).

Three parts, from pure to I/O:

- **builders** (`rest_event`, `submission_event`, `delivery_audit_event`, …): data in, an
  AuditEvent dict out; clock and ids are passed in.
- **the recorder**: `insert_events(conn, events)` writes AuditEvents inside a caller's
  transaction (a submission's own, so accepting and auditing commit together) as one batch per
  table; `record(store, events)` opens that transaction. AuditEvents never pass through
  `save_submission`, so they are never queued for delivery, and they are in no Patient
  compartment, so `$everything` never returns them.
- **the request hook**: views declare `@audited(subtype, action)` and report what they returned
  with `note(...)`; `init_app(app)` registers the after_request hook that writes one AuditEvent
  per audited request, failures (4xx/5xx) included. A 2xx response whose AuditEvent cannot be
  written is replaced by a 503: no PHI leaves without its audit record.

Privacy: an AuditEvent holds ids (UUIDs we minted), resource types, search parameter *names*,
fixed codes, counts and the caller's client id and network address (the address of a system
client, for security review; never a patient's). Never a search value, a request body, an
error message or an id the caller typed that did not resolve to a stored resource.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

import orjson
from flask import Flask, Response, current_app, g, request
from sqlalchemy import Connection, insert

from fhirbridge.api.access import current_principal
from fhirbridge.api.http import FHIR_JSON, services
from fhirbridge.errors import Issue, operation_outcome
from fhirbridge.store.fhirdates import format_instant, micros, parse_range
from fhirbridge.store.schema import resource_history, resources, search_index
from fhirbridge.store.search_params import REFERENCE_ROW, extract_index
from fhirbridge.sync.outbox import Result

if TYPE_CHECKING:
    from fhirbridge.store.resources import ResourceStore, SaveResult
    from fhirbridge.sync import planner

__all__ = [
    "CLIENT_SYSTEM",
    "MAX_ENTITIES",
    "RESOURCE_TYPE",
    "SYNC_CLIENT_ID",
    "Delivered",
    "Ref",
    "audited",
    "delivery_audit_event",
    "init_app",
    "insert_events",
    "note",
    "outcome_for_status",
    "record",
    "record_submission",
    "rest_event",
    "step_audit_event",
    "submission_event",
]

log = logging.getLogger(__name__)

RESOURCE_TYPE: Final = "AuditEvent"
CLIENT_SYSTEM: Final = "urn:fhirbridge:client"
SUBMISSION_SYSTEM: Final = "urn:fhirbridge:submission"
SYNC_CLIENT_ID: Final = "fhirbridge-sync"
OBSERVER: Final = "fhirbridge"
# Entities listed per event; the rest are counted (a 500-entry page costs one event, not 500).
MAX_ENTITIES: Final = 100

SUCCESS: Final = "0"
MINOR_FAILURE: Final = "4"
SERIOUS_FAILURE: Final = "8"

_REST_TYPE: Final = {
    "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
    "code": "rest",
    "display": "RESTful Operation",
}
_INTERACTION: Final = "http://hl7.org/fhir/restful-interaction"
SUBTYPES: Final = frozenset(
    {
        "read",
        "vread",
        "history-instance",
        "search-type",
        "create",
        "update",
        "operation",
        "transaction",
        "batch",
    }
)
ACTIONS: Final = frozenset({"C", "R", "U", "D", "E"})
_SOURCE_ROLE: Final = {
    "coding": [
        {
            "system": "http://dicom.nema.org/resources/ontology/DCM",
            "code": "110153",
            "display": "Source Role ID",
        }
    ]
}
_APPLICATION_SERVER: Final = {
    "system": "http://terminology.hl7.org/CodeSystem/security-source-type",
    "code": "4",
    "display": "Application Server",
}
_SYSTEM_OBJECT: Final = {
    "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
    "code": "2",
    "display": "System Object",
}
_QUERY_ROLE: Final = {
    "system": "http://terminology.hl7.org/CodeSystem/object-role",
    "code": "24",
    "display": "Query",
}
_RESOURCE_TYPES: Final = "http://hl7.org/fhir/resource-types"


# ---------------------------------------------------------------- builders (pure)


class ResourceKey(Protocol):
    """What the builders need of a resource touched: StoredVersion, SavedResource, Ref."""

    @property
    def resource_type(self) -> str: ...

    @property
    def id(self) -> str: ...

    @property
    def version_id(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class Ref:
    """A resource touched, when the caller holds no StoredVersion (ConceptMaps, summaries)."""

    resource_type: str
    id: str
    version_id: str | None = None


@dataclass(frozen=True, slots=True)
class Delivered:
    """One resource of a sync request and what the target's answer made of it (ledger status:
    sent | fallback | skipped | waiting | retrying | dead)."""

    resource_type: str
    id: str
    version_id: str | None
    status: str


def outcome_for_status(status: int) -> str:
    """AuditEvent.outcome for an HTTP status: 0 success, 4 refused (4xx), 8 failed (5xx)."""
    if status < 400:
        return SUCCESS
    return MINOR_FAILURE if status < 500 else SERIOUS_FAILURE


def _instant(recorded: datetime) -> str:
    return format_instant(micros(recorded))


def _reference(key: ResourceKey) -> str:
    base = f"{key.resource_type}/{key.id}"
    return f"{base}/_history/{key.version_id}" if key.version_id else base


def resource_entity(key: ResourceKey, details: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    """entity.what = the resource (versioned when the version is known)."""
    entity: dict[str, Any] = {"what": {"reference": _reference(key)}}
    if details:
        entity["detail"] = [{"type": t, "valueString": v} for t, v in details]
    return entity


def query_entity(
    resource_type: str | None,
    parameters: Iterable[str],
    *,
    returned: int,
    total: int | None = None,
) -> dict[str, Any]:
    """The query of a search: its resource type and parameter NAMES (never their values), how
    many resources matched (`total`) and how many this response returned."""
    entity: dict[str, Any] = {}
    if resource_type is not None:
        entity["type"] = {"system": _RESOURCE_TYPES, "code": resource_type}
    entity["role"] = _QUERY_ROLE
    details = [("parameters", ",".join(sorted(set(parameters))))]
    if total is not None:
        details.append(("total", str(total)))
    details.append(("returned", str(returned)))
    entity["detail"] = [{"type": t, "valueString": v} for t, v in details if v]
    return entity


def _agent(client_id: str, network_address: str | None) -> dict[str, Any]:
    agent: dict[str, Any] = {
        "type": _SOURCE_ROLE,
        "who": {"identifier": {"system": CLIENT_SYSTEM, "value": client_id}},
        # agent.altId is what `altid` searches: the client id as a token
        "altId": client_id,
        "requestor": True,
    }
    if network_address:
        agent["network"] = {"address": network_address, "type": "2"}  # 2 = IP address
    return agent


def _source(site: str | None) -> dict[str, Any]:
    source: dict[str, Any] = {}
    if site:
        source["site"] = site
    source["observer"] = {"display": OBSERVER}
    source["type"] = [_APPLICATION_SERVER]
    return source


def rest_event(
    *,
    event_id: str,
    recorded: datetime,
    subtype: str,
    action: str,
    outcome: str,
    client_id: str,
    entities: Sequence[Mapping[str, Any]] = (),
    network_address: str | None = None,
    site: str | None = None,
    status: int | None = None,
) -> dict[str, Any]:
    """One AuditEvent of type `rest`. `status` (an HTTP status) becomes outcomeDesc on failure:
    only the number, never an error message (messages may name what the caller sent)."""
    if subtype not in SUBTYPES or action not in ACTIONS:
        raise ValueError(f"unknown audit subtype/action {subtype!r}/{action!r}")
    instant = _instant(recorded)
    event: dict[str, Any] = {
        "resourceType": RESOURCE_TYPE,
        "id": event_id,
        "meta": {"versionId": "1", "lastUpdated": instant},
        "type": _REST_TYPE,
        "subtype": [{"system": _INTERACTION, "code": subtype}],
        "action": action,
        "recorded": instant,
        "outcome": outcome,
    }
    if outcome != SUCCESS and status is not None:
        event["outcomeDesc"] = f"HTTP {status}"
    event["agent"] = [_agent(client_id, network_address)]
    event["source"] = _source(site)
    if entities:
        event["entity"] = list(entities)
    return event


def capped(keys: Sequence[ResourceKey]) -> list[dict[str, Any]]:
    """Entities for the first MAX_ENTITIES resources (the count goes in a query detail)."""
    return [resource_entity(k) for k in keys[:MAX_ENTITIES]]


def submission_event(
    *,
    event_id: str,
    recorded: datetime,
    client_id: str,
    saved: SaveResult,
    network_address: str | None = None,
    site: str | None = None,
) -> dict[str, Any]:
    """The AuditEvent of an accepted submission: `create` when it created a resource, else
    `update` (a changed or, with nothing changed, a re-posted document); entities = the
    submission and every resource it stored, at the version it stands at."""
    outcomes = {r.outcome for r in saved.resources}
    subtype, action = ("create", "C") if "created" in outcomes else ("update", "U")
    submission = {
        "what": {"identifier": {"system": SUBMISSION_SYSTEM, "value": saved.submission_id}},
        "type": _SYSTEM_OBJECT,
        "detail": [{"type": "resources", "valueString": str(len(saved.resources))}],
    }
    return rest_event(
        event_id=event_id,
        recorded=recorded,
        subtype=subtype,
        action=action,
        outcome=SUCCESS,
        client_id=client_id,
        entities=[submission, *capped(saved.resources)],
        network_address=network_address,
        site=site,
    )


_DELIVERY_OUTCOME: Final = {"retrying": SERIOUS_FAILURE, "dead": MINOR_FAILURE}
_DELIVERY_ACTION: Final = {"create": "C", "update": "U"}


def delivery_audit_event(
    *,
    event_id: str,
    recorded: datetime,
    target: str,
    interaction: str,
    delivered: Sequence[Delivered],
    site: str | None = None,
) -> dict[str, Any]:
    """The AuditEvent of one request the sync worker made to a target (`interaction`: create,
    update, transaction, batch or search-type). Agent: the worker (`fhirbridge-sync`); entities:
    our resources the request carried, each with the target's name and its ledger status.
    Outcome: 8 when the target or the network failed (the delivery is retried), 4 when the
    target refused it for good (dead letter), else 0."""
    codes = [_DELIVERY_OUTCOME.get(d.status, SUCCESS) for d in delivered]
    outcome = max(codes, key=int, default=SUCCESS)
    entities = [
        resource_entity(d, (("target", target), ("status", d.status)))
        for d in delivered[:MAX_ENTITIES]
    ]
    return rest_event(
        event_id=event_id,
        recorded=recorded,
        subtype=interaction,
        action=_DELIVERY_ACTION.get(interaction, "E"),
        outcome=outcome,
        client_id=SYNC_CLIENT_ID,
        entities=entities,
        site=site,
    )


def step_audit_event(
    step: planner.Step, *, target: str, results: Sequence[Result], recorded: datetime
) -> dict[str, Any] | None:
    """The AuditEvent of one sync step (the worker's ledger results of it), or None when the
    step made no request to the target."""
    interaction = delivery_interaction(step)
    if interaction is None or not results:
        return None
    return delivery_audit_event(
        event_id=str(uuid.uuid4()),
        recorded=recorded,
        target=target,
        interaction=interaction,
        delivered=[Delivered(r.key[0], r.key[1], str(r.version), r.status) for r in results],
    )


def delivery_interaction(step: object) -> str | None:
    """The restful interaction a sync planner step makes at the target; None when it makes no
    request (a Wait, a skip)."""
    # Here, not at the top: only the sync worker records steps, and the planner (with the
    # targets' models) is ~70 ms of the web server's start-up (issue 6).
    from fhirbridge.sync import planner

    if isinstance(step, planner.Transaction):
        return "transaction"
    if isinstance(step, planner.Batch):
        return "batch"
    if isinstance(step, planner.Single):
        return "update" if step.method == "PUT" else "create"
    if isinstance(step, planner.Update):
        return "update"
    if isinstance(step, planner.SearchThenCreate):
        return "create"
    if isinstance(step, planner.MatchPatient):
        return "search-type"
    if isinstance(step, planner.Fallback):
        return None if step.action == "skip" else delivery_interaction(step.write)
    return None


# ---------------------------------------------------------------- the recorder (I/O)


def _content_hash(event: Mapping[str, Any]) -> str:
    # The store's rule: sha256 of the resource without meta.versionId/lastUpdated, keys sorted.
    body = {k: v for k, v in event.items() if k != "meta"}
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def insert_events(conn: Connection, events: Sequence[Mapping[str, Any]]) -> None:
    """Write new AuditEvents (version 1, built above) inside the caller's transaction: one
    batched INSERT per table (current row, history, search index)."""
    if not events:
        return
    current: list[dict[str, Any]] = []
    history: list[dict[str, Any]] = []
    index: list[dict[str, Any]] = []
    for event in events:
        rid = str(event["id"])
        body = orjson.dumps(event).decode()
        last_updated = parse_range(event["meta"]["lastUpdated"])[0]
        current.append(
            {
                "resource_type": RESOURCE_TYPE,
                "id": rid,
                "version_id": 1,
                "last_updated": last_updated,
                "deleted": False,
                "content_hash": _content_hash(event),
                "content": body,
            }
        )
        history.append(
            {
                "resource_type": RESOURCE_TYPE,
                "id": rid,
                "version_id": 1,
                "last_updated": last_updated,
                "outcome": "created",
                "submission_id": None,
                "content": body,
            }
        )
        # The "~ref" rows serve $everything's walk from compartment members; an AuditEvent is
        # never one, and leaving them out halves the rows a read adds.
        index.extend(
            row.columns(RESOURCE_TYPE, rid)
            for row in extract_index(event)
            if row.param != REFERENCE_ROW
        )
    conn.execute(insert(resources), current)
    conn.execute(insert(resource_history), history)
    if index:
        conn.execute(insert(search_index), index)


def record(store: ResourceStore, events: Sequence[Mapping[str, Any]]) -> None:
    """Write AuditEvents in a transaction of their own."""
    if events:
        with store.write() as conn:
            insert_events(conn, events)


# ---------------------------------------------------------------- the request hook (Flask)

_NOTE: Final = "fhirbridge_audit_note"
_DONE: Final = "fhirbridge_audit_done"
_ATTR: Final = "fhirbridge_audit"
# Throttled requests touch nothing; auditing each would turn a flood into a flood of writes.
_NOT_AUDITED_STATUSES: Final = frozenset({429})

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class Audited:
    """A view's audit declaration: the restful interaction and the AuditEvent.action."""

    subtype: str
    action: str


@dataclass(slots=True)
class _Note:
    returned: list[ResourceKey] = field(default_factory=list)
    count: int = 0
    query: bool = False
    query_type: str | None = None
    parameters: tuple[str, ...] = ()
    total: int | None = None
    submission_id: str | None = None


def audited(subtype: str, action: str) -> Callable[[F], F]:
    """Declare that every request to this view is audited, as `subtype` / `action`."""
    if subtype not in SUBTYPES or action not in ACTIONS:
        raise ValueError(f"unknown audit subtype/action {subtype!r}/{action!r}")

    def mark(view: F) -> F:
        setattr(view, _ATTR, Audited(subtype, action))
        return view

    return mark


def audit_of(view: Callable[..., Any] | None) -> Audited | None:
    """The declaration of a view, or None when it is not audited."""
    return getattr(view, _ATTR, None)


def note(
    returned: Iterable[ResourceKey] = (),
    *,
    query_type: str | None = None,
    parameters: Iterable[str] | None = None,
    total: int | None = None,
    submission_id: str | None = None,
) -> None:
    """What the current request returned, for its AuditEvent: the resources (only the first
    MAX_ENTITIES are kept; all are counted) and, for a search (`parameters` given), the
    resource type, the parameter names (modifiers dropped; values never) and the match total."""
    keys = list(returned)
    g.setdefault(_NOTE, _Note())
    current: _Note = g.get(_NOTE)
    current.returned.extend(keys[: max(MAX_ENTITIES - len(current.returned), 0)])
    current.count += len(keys)
    if parameters is not None:
        current.query = True
        current.query_type = query_type
        current.parameters = tuple(sorted({p.partition(":")[0] for p in parameters}))
        current.total = total
    if submission_id is not None:
        current.submission_id = submission_id


def record_submission(conn: Connection, saved: SaveResult, *, now: datetime) -> None:
    """In a submission's own transaction (save_submission's on_saved): its AuditEvent, written
    with it or not at all. The request hook then adds nothing for a successful response."""
    principal = current_principal()
    insert_events(
        conn,
        [
            submission_event(
                event_id=str(uuid.uuid4()),
                recorded=now,
                client_id=principal.client_id,
                saved=saved,
                network_address=request.remote_addr,
                site=_site(),
            )
        ],
    )
    g.setdefault(_DONE, True)


def _site() -> str | None:
    return services().settings.base_url or None


def _entities(current: _Note | None, ok: bool) -> list[dict[str, Any]]:
    # A failed request lists nothing: what it named did not resolve to anything we hold, and
    # an id the caller typed may be anything (an MRN pasted where an id belongs).
    if current is None or not ok:
        return []
    entities: list[dict[str, Any]] = []
    if current.submission_id is not None:
        entities.append(
            {
                "what": {
                    "identifier": {"system": SUBMISSION_SYSTEM, "value": current.submission_id}
                },
                "type": _SYSTEM_OBJECT,
            }
        )
    if current.query:
        entities.append(
            query_entity(
                current.query_type,
                current.parameters,
                returned=current.count,
                total=current.total,
            )
        )
    entities.extend(resource_entity(k) for k in current.returned)
    return entities


def build_request_event(response: Response, decl: Audited, recorded: datetime) -> dict[str, Any]:
    """The AuditEvent of the current request, from its declaration, note and response."""
    status = response.status_code
    ok = status < 400
    return rest_event(
        event_id=str(uuid.uuid4()),
        recorded=recorded,
        subtype=decl.subtype,
        action=decl.action,
        outcome=outcome_for_status(status),
        client_id=current_principal().client_id,
        entities=_entities(g.get(_NOTE), ok),
        network_address=request.remote_addr,
        site=_site(),
        status=status,
    )


def _after(response: Response) -> Response:
    view = current_app.view_functions.get(request.endpoint or "")
    decl = audit_of(view)
    if (
        decl is None
        or response.status_code in _NOT_AUDITED_STATUSES
        or request.method == "OPTIONS"  # answered by Flask itself: the view never ran
    ):
        return response
    ok = response.status_code < 400
    if ok and g.get(_DONE):
        return response  # written in the request's own transaction
    try:
        record(services().store, [build_request_event(response, decl, datetime.now(UTC))])
    except Exception as exc:  # the database, typically; never let the data out unaudited
        log.error("audit write failed: %s", type(exc).__name__)
        if ok:
            issue = Issue(
                "the audit trail cannot be written: the request was not served",
                code="transient",
                severity="error",
            )
            body = orjson.dumps(operation_outcome([issue]))
            return Response(body, status=503, content_type=f"{FHIR_JSON}; charset=utf-8")
    return response


def init_app(app: Flask) -> None:
    """Audit every request to a view declared `@audited`, after its response is computed."""
    app.after_request(_after)
