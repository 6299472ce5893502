"""The write planner: (target, capabilities, due resources, what is on the target) → a Plan.

PURE: no I/O, no clock, no randomness; the same input gives the same plan, so
``fhirbridge sync plan`` prints exactly what the worker would send.

How one due resource (one ``Type/id`` at one version) is planned:

1. Already sent at this version (``ledger.sent_version == version``): nothing.
2. Not routed to the target (``Target.resource_types``): ``Fallback(skip)``.
3. Already on the target (``server_refs`` or the ledger's ``server_id``) at an older version:
   ``Update`` (PUT to the server's id, If-Match with the server's version where the target
   honours it). A target that cannot update the type gets the type's fallback instead.
4. New, and the target can create the type: the write that can be retried safely —
   PUT to our deterministic id where it allows update-as-create; else POST with
   ``If-None-Exist: identifier=<system>|<value>`` where it allows conditional create; else
   ``SearchThenCreate`` where it can search the type by identifier; else a plain POST flagged
   ``unverifiable_retry`` (see below). Writes are grouped into one ``Transaction`` where the
   target has transactions, into ``Batch`` steps per dependency level where it has only batch,
   and are otherwise one request each (``Single``/``SearchThenCreate``).
5. New, and the target cannot create the type: ``Fallback`` — ``skip``, or ``note``: a
   DocumentReference with a readable plain-text summary of the record, written with the same
   safe-write rule (the note has its own identifier, ``<our system>#note|<our value>``).

``unverifiable_retry``: AdverseEvent (no identifier search parameter in R4), Provenance (no
identifier) and, on Oracle Health, Observation/Procedure/DocumentReference (no identifier search
there) cannot be found again by identifier. Where such a type can only be created by a plain
POST, the write is flagged: on an unknown outcome (timeout, connection reset after sending) the
worker dead-letters it instead of re-sending, because a second POST would create a duplicate
in a hospital chart. In transaction mode these writes are kept out of the transaction (as
``Single`` steps after it) so that the transaction itself stays safe to re-send.

References. Our resources reference each other as ``Type/<our id>``. In a plan each reference is
rewritten to what the target knows: the matched patient (``patient_ref``), an existing target
Encounter (``encounter_refs``), a delivered resource (``server_refs``), our own id when that
resource is PUT to our id, ``urn:uuid:<our id>`` for a resource POSTed in the same transaction.
A reference to a resource the target will never hold (a type it cannot take, a type not routed,
a resource delivered as a note) is removed where R4 allows it (``performer``, ``participant``,
``episodeOfCare``, ``partOf``, ``suspectEntity``, ``Provenance.target`` items; optional
references such as ``encounter``); a required one (``subject``, ``patient``,
``medicationReference``) makes the resource fall back. A reference to a resource that is still to
be created by a POST elsewhere in the plan is *awaited*: the step lists it in ``awaiting`` and
still holds our reference; the worker runs the steps before it, records their results, and
re-plans. A reference to something that is neither on the target nor in the plan makes the
resource ``Wait`` (visible in the ledger, not a failure); so does, on a target that
``requires_existing_encounter`` (Epic), a reference to an Encounter with no entry in
``encounter_refs`` ("no matching encounter on target").

The patient. With ``Target.patient_identifier`` our Patient is *matched*, never overwritten: when
``patient_ref`` is unknown the plan is a ``MatchPatient`` step (search
``Patient?identifier=<hospital system>|<our MRN>``; with ``create_patient``, create ours when
nothing matches, carrying the hospital identifier so that the next match finds it) and every
other resource waits for it. Without ``patient_identifier`` the Patient is an ordinary resource.

Nothing here puts patient data into ``describe()``/``render()``: they name resource types, our
ids, methods, URLs without identifier values and reasons. ``to_dict()`` carries the bodies.
"""

from __future__ import annotations

import base64
import copy
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeAlias

import orjson

from fhirbridge.sync.capabilities import Capabilities
from fhirbridge.sync.targets import FallbackAction, Target

__all__ = [
    "Batch",
    "Due",
    "Entry",
    "Fallback",
    "Ledger",
    "MatchPatient",
    "Plan",
    "PlannedWrite",
    "SearchThenCreate",
    "Single",
    "Step",
    "Transaction",
    "Update",
    "Wait",
    "note_for",
    "plan",
    "references",
    "render",
]

JSON: TypeAlias = dict[str, Any]
Method = Literal["PUT", "POST"]
_Mode = Literal["PUT", "POST_INE", "SEARCH", "POST"]

#: Namespace of the deterministic ids of notes PUT to targets that allow update-as-create.
NOTE_NAMESPACE = uuid.UUID("6f1d7c1e-2f57-5b8e-9d0a-4a3c8e1b2d40")

_REF = re.compile(r"([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})")
_REF_MEMBER = re.compile(rb'"reference":"([A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64})"')
_INSTANT = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})"
)
# Tie-break of the dependency order (the order a reader expects); references decide first.
_RANK = {
    t: i
    for i, t in enumerate(
        (
            "Patient",
            "Practitioner",
            "Medication",
            "EpisodeOfCare",
            "Encounter",
            "Procedure",
            "MedicationAdministration",
            "Observation",
            "AdverseEvent",
            "DocumentReference",
            "Provenance",
        )
    )
}
# References R4 requires (1..1) on the types we produce: they cannot be dropped.
_REQUIRED_REFS = frozenset({"subject", "patient", "medicationReference"})
# Reference data, not clinical writes: no encounter needed even where the target wants one.
_NO_ENCOUNTER_NEEDED = frozenset(
    {"Patient", "Practitioner", "PractitionerRole", "Organization", "Location", "Medication"}
)
_NO_ENCOUNTER = (
    "the target files clinical writes only against an existing encounter, and this record "
    "references none"
)
# Backbone elements that mean nothing without their reference: drop the whole item.
_ESSENTIAL_CHILD = frozenset({"actor", "individual", "instance", "who"})
_MR_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0203"
_US_CORE_DOC_CATEGORY = "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category"


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ledger:
    """What the ledger knows about one (target, resource).

    ``server_id``: the id on the target of what we wrote for it (the DocumentReference's id when
    it went as a note; ``server_refs`` says which, with its type); ``server_version``: the
    target's version of it (for If-Match); ``sent_version``: our version last delivered (or
    recorded as skipped); ``state``: the outbox status.
    """

    server_id: str | None
    server_version: str | None
    sent_version: str | None
    state: str


@dataclass(frozen=True, slots=True)
class Due:
    """What we have to send for one (type, id): our current resource and its version."""

    resource: JSON
    version: str
    ledger: Ledger | None = None

    @property
    def key(self) -> str:
        return f"{self.resource['resourceType']}/{self.resource['id']}"


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlannedWrite:
    """One HTTP write of a plan, flattened (for checks and summaries)."""

    key: str
    method: Method
    resource_type: str
    url: str
    via: str
    if_none_exist: str | None = None
    if_match: str | None = None


class Step:
    """One thing the worker does; ``describe()`` for humans, ``to_dict()`` for JSON."""

    __slots__ = ()
    kind: ClassVar[str] = "step"

    def settles(self) -> tuple[str, ...]:
        """The due resources (our ``Type/id``) whose ledger rows this step settles."""
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def to_dict(self) -> JSON:
        raise NotImplementedError

    def writes(self) -> Iterator[PlannedWrite]:
        return iter(())


def _awaiting_text(awaiting: Sequence[str]) -> str:
    if not awaiting:
        return ""
    shown = ", ".join(awaiting[:3])
    if len(awaiting) > 3:
        shown += f" and {len(awaiting) - 3} more"
    return f" [awaits {shown}: re-planned after them]"


def _search_text(identifier: str) -> str:
    # identifier values are source record keys: shown as the system only
    return f"identifier={identifier.split('|', 1)[0]}|…"


@dataclass(frozen=True, slots=True)
class Entry:
    """One entry of a transaction or batch Bundle."""

    key: str
    method: Method
    url: str
    resource: JSON
    full_url: str
    if_none_exist: str | None = None
    if_match: str | None = None
    unverifiable_retry: bool = False

    def bundle_entry(self) -> JSON:
        request: JSON = {"method": self.method, "url": self.url}
        if self.if_none_exist is not None:
            request["ifNoneExist"] = self.if_none_exist
        if self.if_match is not None:
            request["ifMatch"] = self.if_match
        return {"fullUrl": self.full_url, "resource": self.resource, "request": request}

    def describe(self) -> str:
        extra = ""
        if self.if_none_exist is not None:
            extra = f" if-none-exist {_search_text(self.if_none_exist.removeprefix('identifier='))}"
        if self.unverifiable_retry:
            extra += " (unverifiable: dead-letter on an unknown outcome)"
        target = self.url if self.method == "PUT" else f"{self.url} ← {self.key}"
        return f"{self.method} {target}{extra}"

    def to_dict(self) -> JSON:
        return {
            "key": self.key,
            "unverifiableRetry": self.unverifiable_retry,
            **self.bundle_entry(),
        }


@dataclass(frozen=True, slots=True)
class _BundleStep(Step):
    entries: tuple[Entry, ...]
    awaiting: tuple[str, ...] = ()
    bundle_type: ClassVar[str] = "batch"

    def settles(self) -> tuple[str, ...]:
        return tuple(e.key for e in self.entries)

    @property
    def unverifiable_retry(self) -> bool:
        return any(e.unverifiable_retry for e in self.entries)

    def bundle(self) -> JSON:
        return {
            "resourceType": "Bundle",
            "type": self.bundle_type,
            "entry": [e.bundle_entry() for e in self.entries],
        }

    def describe(self) -> str:
        lines = [
            f"{self.kind}: POST {self.bundle_type} Bundle of {len(self.entries)} entries"
            + _awaiting_text(self.awaiting)
        ]
        lines += [f"    {e.describe()}" for e in self.entries]
        return "\n".join(lines)

    def to_dict(self) -> JSON:
        return {
            "kind": self.kind,
            "awaiting": list(self.awaiting),
            "unverifiableRetry": self.unverifiable_retry,
            "entries": [e.to_dict() for e in self.entries],
            "bundle": self.bundle(),
        }

    def writes(self) -> Iterator[PlannedWrite]:
        for e in self.entries:
            yield PlannedWrite(
                e.key,
                e.method,
                e.resource["resourceType"],
                e.url,
                self.kind,
                e.if_none_exist,
                e.if_match,
            )


@dataclass(frozen=True, slots=True)
class Transaction(_BundleStep):
    """One transaction Bundle: all or nothing, urn:uuid references resolved by the server."""

    kind: ClassVar[str] = "transaction"
    bundle_type: ClassVar[str] = "transaction"


@dataclass(frozen=True, slots=True)
class Batch(_BundleStep):
    """One batch Bundle of one dependency level; entries succeed or fail one by one.

    A batch does not resolve urn:uuid, so every reference in it is already a server reference;
    a batch with ``awaiting`` is a preview that the worker re-plans after the awaited writes.
    """

    level: int = 0
    kind: ClassVar[str] = "batch"
    bundle_type: ClassVar[str] = "batch"

    def to_dict(self) -> JSON:
        return {**_BundleStep.to_dict(self), "level": self.level}


@dataclass(frozen=True, slots=True)
class Single(Step):
    """One request for one resource: PUT to an id, or POST (with If-None-Exist when possible)."""

    key: str
    method: Method
    url: str
    body: JSON
    if_match: str | None = None
    if_none_exist: str | None = None
    unverifiable_retry: bool = False
    awaiting: tuple[str, ...] = ()
    kind: ClassVar[str] = "single"

    def settles(self) -> tuple[str, ...]:
        return (self.key,)

    def describe(self) -> str:
        text = f"{self.method} {self.url}"
        if self.method == "POST":
            text += f" ← {self.key}"
        if self.if_match is not None:
            text += f" If-Match {self.if_match}"
        if self.if_none_exist is not None:
            text += f" If-None-Exist {_search_text(self.if_none_exist.removeprefix('identifier='))}"
        if self.unverifiable_retry:
            text += " (unverifiable: dead-letter on an unknown outcome)"
        return text + _awaiting_text(self.awaiting)

    def to_dict(self) -> JSON:
        return {
            "kind": self.kind,
            "key": self.key,
            "method": self.method,
            "url": self.url,
            "ifMatch": self.if_match,
            "ifNoneExist": self.if_none_exist,
            "unverifiableRetry": self.unverifiable_retry,
            "awaiting": list(self.awaiting),
            "body": self.body,
        }

    def writes(self) -> Iterator[PlannedWrite]:
        yield PlannedWrite(
            self.key,
            self.method,
            self.body["resourceType"],
            self.url,
            self.kind,
            self.if_none_exist,
            self.if_match,
        )


@dataclass(frozen=True, slots=True)
class SearchThenCreate(Step):
    """Search ``type?identifier=...``; record the result in the ledger; POST only on no match."""

    key: str
    type: str
    identifier: str
    body: JSON
    awaiting: tuple[str, ...] = ()
    kind: ClassVar[str] = "search-then-create"

    def settles(self) -> tuple[str, ...]:
        return (self.key,)

    @property
    def search(self) -> tuple[str, dict[str, str]]:
        """The search request: type and query parameters."""
        return self.type, {"identifier": self.identifier}

    def describe(self) -> str:
        return (
            f"GET {self.type}?{_search_text(self.identifier)}; none found: POST {self.type}"
            f" ← {self.key}" + _awaiting_text(self.awaiting)
        )

    def to_dict(self) -> JSON:
        return {
            "kind": self.kind,
            "key": self.key,
            "type": self.type,
            "identifier": self.identifier,
            "awaiting": list(self.awaiting),
            "body": self.body,
        }

    def writes(self) -> Iterator[PlannedWrite]:
        yield PlannedWrite(self.key, "POST", self.type, self.type, self.kind)


@dataclass(frozen=True, slots=True)
class Update(Step):
    """PUT a new version of a resource the target already holds, at the target's id."""

    key: str
    url: str
    body: JSON
    if_match: str | None = None
    awaiting: tuple[str, ...] = ()
    kind: ClassVar[str] = "update"

    def settles(self) -> tuple[str, ...]:
        return (self.key,)

    def describe(self) -> str:
        match = f" If-Match {self.if_match}" if self.if_match is not None else ""
        return f"PUT {self.url}{match} (new version of {self.key})" + _awaiting_text(self.awaiting)

    def to_dict(self) -> JSON:
        return {
            "kind": self.kind,
            "key": self.key,
            "url": self.url,
            "ifMatch": self.if_match,
            "awaiting": list(self.awaiting),
            "body": self.body,
        }

    def writes(self) -> Iterator[PlannedWrite]:
        yield PlannedWrite(
            self.key, "PUT", self.body["resourceType"], self.url, self.kind, None, self.if_match
        )


_NoteWrite: TypeAlias = Single | SearchThenCreate | Update


@dataclass(frozen=True, slots=True)
class Fallback(Step):
    """A resource the target cannot take: skipped, or sent as a DocumentReference note.

    ``write`` is how the note is written (same safe-write rule as any resource).
    """

    key: str
    action: FallbackAction
    reason: str
    note: JSON | None = None
    write: _NoteWrite | None = None
    kind: ClassVar[str] = "fallback"

    def settles(self) -> tuple[str, ...]:
        return (self.key,)

    @property
    def awaiting(self) -> tuple[str, ...]:
        return self.write.awaiting if self.write is not None else ()

    @property
    def unverifiable_retry(self) -> bool:
        """Whether the note's write is a plain POST that must not be re-sent blind."""
        return isinstance(self.write, Single) and self.write.unverifiable_retry

    def describe(self) -> str:
        if self.action == "skip" or self.write is None:
            return f"skip {self.key}: {self.reason}"
        return f"note for {self.key} ({self.reason}): {self.write.describe()}"

    def to_dict(self) -> JSON:
        return {
            "kind": self.kind,
            "key": self.key,
            "action": self.action,
            "reason": self.reason,
            "note": self.note,
            "write": self.write.to_dict() if self.write is not None else None,
        }

    def writes(self) -> Iterator[PlannedWrite]:
        if self.write is not None:
            via = "note-update" if isinstance(self.write, Update) else "note"
            for w in self.write.writes():
                yield PlannedWrite(
                    w.key, w.method, w.resource_type, w.url, via, w.if_none_exist, w.if_match
                )


@dataclass(frozen=True, slots=True)
class Wait(Step):
    """Not sent now, for a reason the ledger shows (not a failure)."""

    key: str
    reason: str
    kind: ClassVar[str] = "wait"

    def settles(self) -> tuple[str, ...]:
        return (self.key,)

    def describe(self) -> str:
        return f"wait {self.key}: {self.reason}"

    def to_dict(self) -> JSON:
        return {"kind": self.kind, "key": self.key, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class MatchPatient(Step):
    """Find our patient on the target: ``GET Patient?identifier=<system>|<value>``.

    One match: the worker records it as the Patient's server id and re-plans. None: ``create``
    when the target may create patients (its body carries the hospital identifier), else the
    patient's resources wait. Several: a dead letter (ambiguous identity is for a human).
    """

    key: str
    system: str
    value: str
    create: Single | None = None
    kind: ClassVar[str] = "match-patient"

    def settles(self) -> tuple[str, ...]:
        return (self.key,)

    @property
    def identifier(self) -> str:
        return f"{self.system}|{self.value}"

    def describe(self) -> str:
        text = f"GET Patient?identifier={self.system}|… to find {self.key} on the target"
        if self.create is not None:
            return text + f"; none found: {self.create.describe()}"
        return text + "; none found: wait (the hospital registers patients)"

    def to_dict(self) -> JSON:
        return {
            "kind": self.kind,
            "key": self.key,
            "system": self.system,
            "value": self.value,
            "create": self.create.to_dict() if self.create is not None else None,
        }

    def writes(self) -> Iterator[PlannedWrite]:
        if self.create is not None:
            for w in self.create.writes():
                yield PlannedWrite(
                    w.key, w.method, w.resource_type, w.url, self.kind, None, w.if_match
                )


@dataclass(frozen=True, slots=True)
class Plan:
    """The ordered steps for one target and one patient's due resources."""

    target: str
    profile: str
    steps: tuple[Step, ...]

    def writes(self) -> Iterator[PlannedWrite]:
        for step in self.steps:
            yield from step.writes()

    def step_for(self, key: str) -> Step | None:
        """The step that settles ``key`` (our ``Type/id``), if any."""
        for step in self.steps:
            if key in step.settles():
                return step
        return None

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for step in self.steps:
            name = step.kind
            if isinstance(step, Fallback):
                name = f"fallback-{step.action}"
            out[name] = out.get(name, 0) + 1
        return out

    def to_dict(self) -> JSON:
        return {
            "target": self.target,
            "profile": self.profile,
            "steps": [s.to_dict() for s in self.steps],
        }


def render(plan: Plan) -> str:
    """A readable listing of the plan (no patient data), for ``fhirbridge sync plan``."""
    counts = plan.counts()
    writes = sum(1 for _ in plan.writes())
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    lines = [
        f"target {plan.target} (profile {plan.profile}): {len(plan.steps)} steps, "
        f"{writes} writes" + (f" — {summary}" if summary else "")
    ]
    if not plan.steps:
        lines.append("  nothing to do")
    width = len(str(len(plan.steps)))
    for number, step in enumerate(plan.steps, 1):
        first, *rest = step.describe().splitlines()
        lines.append(f"  {number:>{width}}. {first}")
        lines += [f"  {' ' * width}  {line}" for line in rest]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------

_Action = Literal["done", "write", "update", "note", "skip", "wait", "matched"]


@dataclass(slots=True)
class _Item:
    due: Due
    key: str
    rtype: str
    rid: str
    refs: tuple[str, ...]  # references(due.resource), read once
    order: int = 0
    action: _Action = "wait"
    reason: str = ""
    mode: _Mode | None = None
    # where the resource already is on the target (for updates; a DocumentReference for notes)
    delivered: str | None = None
    body: JSON | None = None
    note: JSON | None = None
    deps: set[str] = field(default_factory=set)  # in-plan writes this one must follow
    pending: set[str] = field(default_factory=set)  # in-plan POSTs whose ids are still unknown
    level: int = 0


@dataclass(slots=True)
class _Ctx:
    target: Target
    caps: Capabilities
    items: dict[str, _Item]
    server_refs: Mapping[str, str]
    encounter_refs: dict[str, str]
    patient_key: str | None
    patient_ref: str | None
    lookup: Mapping[str, JSON]


def plan(
    target: Target,
    caps: Capabilities,
    due: list[Due],
    *,
    server_refs: Mapping[str, str],
    patient_ref: str | None,
    encounter_refs: Mapping[str, str],
) -> Plan:
    """Plan the writes of one patient's due resources to one target (pure; see module doc).

    ``server_refs``: our ``Type/id`` → the target's ``Type/id`` for what is already delivered
    (a note's DocumentReference for resources delivered as notes). ``patient_ref``: the target's
    Patient reference when matched. ``encounter_refs``: our Encounter (``Encounter/id`` or bare
    id) → an existing Encounter on the target.
    """
    items: dict[str, _Item] = {}
    for d in due:
        rtype, rid = d.resource.get("resourceType"), d.resource.get("id")
        if not isinstance(rtype, str) or not isinstance(rid, str):
            raise ValueError("every due resource needs a resourceType and an id")
        key = f"{rtype}/{rid}"
        if key in items:
            raise ValueError(f"{key} is due twice")
        items[key] = _Item(d, key, rtype, rid, tuple(references(d.resource)))
    patients = {k for k, i in items.items() if i.rtype == "Patient"}
    patients |= {r for i in items.values() for r in i.refs if r.startswith("Patient/")}
    if len(patients) > 1:
        raise ValueError("a plan covers the resources of one patient")
    patient_key = next(iter(patients), None)
    enc = {(k if "/" in k else f"Encounter/{k}"): v for k, v in encounter_refs.items()}
    if patient_key is not None and patient_ref is None and target.patient_identifier is not None:
        # matched earlier: the worker knows it from server_refs or from the Patient's ledger row
        patient_ref = server_refs.get(patient_key)
        patient = items.get(patient_key)
        ledger = patient.due.ledger if patient is not None else None
        if patient_ref is None and ledger is not None and ledger.server_id is not None:
            patient_ref = f"Patient/{ledger.server_id}"
    lookup = {k: i.due.resource for k, i in items.items()}
    ctx = _Ctx(target, caps, items, server_refs, enc, patient_key, patient_ref, lookup)

    _order(items)
    ordered = sorted(items.values(), key=lambda i: i.order)
    match = _patient_gate(ctx, ordered)
    if match is not None:
        return Plan(target.name, caps.name, match)
    for item in ordered:
        _decide(ctx, item)
    for item in ordered:
        _resolve(ctx, item)
    return Plan(target.name, caps.name, tuple(_steps(ctx, ordered)))


# ------------------------------------------------------------------------------ references


def _copy(resource: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of JSON data: an orjson round trip, several times faster than deepcopy."""
    copied: dict[str, Any] = orjson.loads(orjson.dumps(resource))
    return copied


def references(resource: Any) -> Iterator[str]:
    """Every relative ``Type/id`` Reference.reference in a resource (any depth).

    Read off the resource's JSON with one regular expression: the planner asks this of every
    resource several times per pass, and a Python walk of the tree cost more than the rest of
    planning. A JSON string cannot hold an unescaped quote, so a match is always a whole
    ``"reference": "Type/id"`` member (the same members the tree walk of `_ref_paths` finds).
    """
    return (m.decode() for m in _REF_MEMBER.findall(orjson.dumps(resource)))


def _ref_paths(node: Any) -> list[tuple[tuple[str | int, ...], str]]:
    """(path, reference) of every relative ``Type/id`` Reference.reference under ``node``,
    in document order (an explicit stack: the planner walks every resource several times)."""
    found: list[tuple[tuple[str | int, ...], str]] = []
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(node, ())]
    while stack:
        item, path = stack.pop()
        if isinstance(item, dict):
            ref = item.get("reference")
            if isinstance(ref, str) and _REF.fullmatch(ref):
                found.append((path, ref))
            children = [(v, (*path, k)) for k, v in item.items() if k != "reference"]
        elif isinstance(item, list):
            children = [(v, (*path, i)) for i, v in enumerate(item)]
        else:
            continue
        stack.extend(
            (v, child_path) for v, child_path in reversed(children) if isinstance(v, dict | list)
        )
    return found


def _order(items: dict[str, _Item]) -> None:
    """Dependency order: referenced resources first; ties by the usual type order, then input."""
    position = {k: n for n, k in enumerate(items)}
    deps = {k: {r for r in i.refs if r in items and r != k} for k, i in items.items()}
    indegree = {k: len(v) for k, v in deps.items()}
    users: dict[str, list[str]] = {k: [] for k in items}
    for k, ds in deps.items():
        for d in ds:
            users[d].append(k)

    def rank(k: str) -> tuple[int, int]:
        return (_RANK.get(items[k].rtype, len(_RANK) - 2), position[k])

    ready = sorted((k for k, n in indegree.items() if n == 0), key=rank)
    done: list[str] = []
    while ready:
        k = ready.pop(0)
        done.append(k)
        for u in users[k]:
            indegree[u] -= 1
            if indegree[u] == 0:
                ready.append(u)
        ready.sort(key=rank)
    # a reference cycle (not produced by our mappings): the rest in input order
    done += [k for k in items if k not in set(done)]
    for n, k in enumerate(done):
        items[k].order = n


# ------------------------------------------------------------------------------ patient


def _mrn(patient: JSON) -> str | None:
    for ident in patient.get("identifier") or []:
        if not isinstance(ident, dict) or not isinstance(ident.get("value"), str):
            continue
        codings = (ident.get("type") or {}).get("coding") or []
        typed_mr = any(c.get("system") == _MR_SYSTEM and c.get("code") == "MR" for c in codings)
        system = ident.get("system")
        if typed_mr or (isinstance(system, str) and system.endswith(":mrn")):
            return str(ident["value"])
    return None


def _patient_gate(ctx: _Ctx, ordered: list[_Item]) -> tuple[Step, ...] | None:
    """The whole plan when the patient is still to be matched; None when planning can go on."""
    target = ctx.target
    if target.patient_identifier is None or ctx.patient_ref is not None:
        return None
    if ctx.patient_key is None:  # nothing patient-bound in this plan (e.g. practitioners only)
        return None
    steps: list[Step] = []
    patient = ctx.items.get(ctx.patient_key) if ctx.patient_key else None
    reason = "waits for the patient to be matched on the target"
    if patient is not None and not _already_sent(patient):
        mrn = _mrn(patient.due.resource)
        if mrn is None:
            steps.append(Wait(patient.key, "our Patient has no MRN identifier to match on"))
            reason = "waits for the patient (no MRN to match on)"
        else:
            steps.append(
                MatchPatient(
                    patient.key,
                    target.patient_identifier.system,
                    mrn,
                    _patient_create(ctx, patient, mrn),
                )
            )
    for item in ordered:
        if item is patient or _already_sent(item):
            continue
        if not target.routes(item.rtype):
            steps.append(Fallback(item.key, "skip", f"{item.rtype} is not routed to this target"))
        else:
            steps.append(Wait(item.key, reason))
    return tuple(steps)


def _patient_create(ctx: _Ctx, patient: _Item, mrn: str) -> Single | None:
    pid = ctx.target.patient_identifier
    caps = ctx.caps.of("Patient")
    if not ctx.target.create_patient or pid is None or not caps.writable:
        return None
    body = _copy(patient.due.resource)
    # Carry the hospital's identifier so that the next match finds the patient we created.
    body["identifier"] = [*(body.get("identifier") or []), {"system": pid.system, "value": mrn}]
    if caps.update_create:
        return Single(patient.key, "PUT", patient.key, body)
    body.pop("id", None)
    # Verifiable: a retry is preceded by the match, which finds what an earlier POST created.
    return Single(patient.key, "POST", "Patient", body)


def _already_sent(item: _Item) -> bool:
    ledger = item.due.ledger
    return ledger is not None and ledger.sent_version == item.due.version


# ------------------------------------------------------------------------------ decisions


def _identity(resource: JSON) -> tuple[str, str] | None:
    """Our identity identifier (the first one: ``urn:fhirbridge:<source>:<kind>``)."""
    ident = resource.get("identifier")
    if isinstance(ident, list):
        ident = ident[0] if ident else None
    if isinstance(ident, dict):
        system, value = ident.get("system"), ident.get("value")
        if isinstance(system, str) and isinstance(value, str):
            return system, value
    return None


def _mode(ctx: _Ctx, rtype: str, resource: JSON) -> _Mode | None:
    """The safest create the target allows for this type (None: it cannot create it)."""
    caps = ctx.caps.of(rtype)
    has_identity = _identity(resource) is not None
    if caps.update_create:
        return "PUT"
    if caps.conditional_create and caps.create and has_identity:
        return "POST_INE"
    if caps.create and caps.search_identifier and has_identity:
        return "SEARCH"
    if caps.create:
        return "POST"
    return None


def _delivered(ctx: _Ctx, item: _Item) -> str | None:
    ref = ctx.server_refs.get(item.key)
    if ref is not None:
        return ref
    ledger = item.due.ledger
    if ledger is not None and ledger.server_id is not None and ledger.sent_version is not None:
        rtype = "DocumentReference" if ledger.state == "fallback" else item.rtype
        return f"{rtype}/{ledger.server_id}"
    return None


def _decide(ctx: _Ctx, item: _Item) -> None:
    target, caps = ctx.target, ctx.caps
    delivered = _delivered(ctx, item)
    item.delivered = delivered
    if _already_sent(item):
        item.action = "done"
        return
    if not target.routes(item.rtype):
        item.action, item.reason = "skip", f"{item.rtype} is not routed to this target"
        return
    if item.key == ctx.patient_key and target.patient_identifier is not None:
        item.action = "matched"
        item.reason = "matched to the hospital's patient; its record is not overwritten"
        return
    if delivered is not None:
        if not delivered.startswith(f"{item.rtype}/"):  # delivered earlier as a note
            item.action, item.reason = "note", "a new version of a record sent as a note"
            return
        if caps.of(item.rtype).update:
            item.action = "update"
            return
        _fall_back(ctx, item, f"the target cannot update {item.rtype}")
        return
    mode = _mode(ctx, item.rtype, item.due.resource)
    if mode is None:
        _fall_back(ctx, item, f"the target cannot create {item.rtype}")
        return
    item.action, item.mode = "write", mode


def _fall_back(ctx: _Ctx, item: _Item, reason: str) -> None:
    item.action = ctx.target.fallback(item.rtype)
    item.reason = reason


# ------------------------------------------------------------------------------ resolution

_Status = tuple[Literal["known", "pending", "absent", "wait"], str]


def _status(ctx: _Ctx, ref: str) -> _Status:
    """Where a referenced resource is (or will be) on the target."""
    rtype = ref.split("/", 1)[0]
    if ref == ctx.patient_key and ctx.patient_ref is not None:
        return "known", ctx.patient_ref
    if rtype == "Encounter" and ref in ctx.encounter_refs:
        return "known", ctx.encounter_refs[ref]
    server = ctx.server_refs.get(ref)
    if server is not None:
        if server.startswith(f"{rtype}/"):
            return "known", server
        return "absent", "delivered as a note"
    status = _status_in_plan(ctx, ref, rtype)
    if ctx.caps.requires_existing_encounter and rtype == "Encounter" and status[0] != "known":
        return "wait", "no matching encounter on target"
    return status


def _status_in_plan(ctx: _Ctx, ref: str, rtype: str) -> _Status:
    other = ctx.items.get(ref)
    if other is None:
        if not ctx.target.routes(rtype) or not ctx.caps.of(rtype).writable:
            return "absent", f"the target does not take {rtype}"
        return "wait", f"waits for {ref} to reach the target first"
    if other.action == "write":
        return ("known", ref) if other.mode == "PUT" else ("pending", ref)
    if other.action in ("update", "done") and other.delivered is not None:
        if other.delivered.startswith(f"{rtype}/"):
            return "known", other.delivered
        return "absent", "delivered as a note"
    if other.action == "done":
        ledger = other.due.ledger
        if ledger is not None and ledger.server_id is not None and ledger.state != "fallback":
            return "known", f"{rtype}/{ledger.server_id}"
        return "absent", "not on the target"
    if other.action == "wait":
        return "wait", f"waits for {ref}"
    return "absent", f"{ref} is not sent as {rtype}"


def _detach(body: JSON, path: tuple[str | int, ...]) -> bool:
    """Remove the reference at ``path`` where R4 allows it; False when it is required."""
    if len(path) == 1 and path[0] in _REQUIRED_REFS:
        return False
    # the innermost list item that is the reference, or whose essential child it is
    cut: tuple[str | int, ...] = path
    if isinstance(path[-1], int):
        cut = path
    elif len(path) >= 2 and isinstance(path[-2], int) and path[-1] in _ESSENTIAL_CHILD:
        cut = path[:-1]
    parent: Any = body
    for step in cut[:-1]:
        parent = parent[step]
    last = cut[-1]
    # a marker, not a deletion: list indices of the other paths must stay valid
    parent[last] = _REMOVED
    return True


_REMOVED: Any = object()


def _prune(node: Any) -> Any:
    """Drop removed references and the empty arrays/objects they leave (invalid in FHIR)."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if v is _REMOVED:
                continue
            pruned = _prune(v)
            if pruned is _REMOVED:
                continue
            out[k] = pruned
        return out if out else _REMOVED
    if isinstance(node, list):
        items = [p for p in (_prune(v) for v in node if v is not _REMOVED) if p is not _REMOVED]
        return items if items else _REMOVED
    return node


def _reachable(body: JSON, path: tuple[str | int, ...]) -> bool:
    node: Any = body
    for step in path:
        node = node[step]
        if node is _REMOVED:
            return False
    return True


def _set_ref(body: JSON, path: tuple[str | int, ...], value: str) -> None:
    node: Any = body
    for step in path:
        node = node[step]
    node["reference"] = value


def _resolve(ctx: _Ctx, item: _Item) -> None:
    """Rewrite the references of a write/update/note; turn it into a wait or fallback if needed."""
    if item.action == "note":
        _resolve_note(ctx, item)
        return
    if item.action not in ("write", "update"):
        return
    if _resolve_unchanged(ctx, item):
        return
    body = _copy(item.due.resource)
    removed = False
    encounter_known = False
    for path, ref in _ref_paths(body):
        if ref == item.key or not _reachable(body, path):  # inside an element already dropped
            continue
        kind, value = _status(ctx, ref)
        if item.rtype == "Provenance" and _is_matched_patient(ctx, ref):
            # the hospital's own patient record is not something our import created
            kind, value = "absent", "matched, not written by us"
        encounter_known |= kind == "known" and ref.startswith("Encounter/")
        if kind == "wait":
            item.action, item.reason = "wait", value
            return
        if kind == "absent":
            if not _detach(body, path):
                _fall_back(ctx, item, f"it needs {ref}, which this target does not hold")
                _resolve_note(ctx, item)  # a no-op unless the fallback is a note
                return
            removed = True
        elif kind == "pending":
            item.deps.add(ref)
            item.pending.add(ref)
            continue  # our reference stays until the step is re-planned (or urn:uuid)
        else:
            _set_ref(body, path, value)
            if ref in ctx.items and ctx.items[ref].action == "write":
                item.deps.add(ref)  # PUT in this plan: known id, but written first
    if (
        ctx.caps.requires_existing_encounter
        and not encounter_known
        and item.rtype not in _NO_ENCOUNTER_NEEDED
    ):
        item.action, item.reason = "skip", _NO_ENCOUNTER
        return
    if removed:
        pruned = _prune(body)
        body = pruned if isinstance(pruned, dict) else {}
        if item.rtype == "Provenance" and "target" not in body:
            item.action, item.reason = "skip", "none of the resources it describes is on the target"
            return
    if item.action == "update":
        assert item.delivered is not None
        body["id"] = item.delivered.split("/", 1)[1]
    item.body = body


def _resolve_unchanged(ctx: _Ctx, item: _Item) -> bool:
    """`_resolve` without the walk of the resource's tree, for the common case where no
    reference changes: each one is known on the target as itself (a resource PUT to our id,
    in this plan or before). False (nothing done) otherwise: the walk decides."""
    refs = [r for r in item.refs if r != item.key]
    encounter_known = False
    for ref in refs:
        kind, value = _status(ctx, ref)
        if kind != "known" or value != ref:
            return False
        if item.rtype == "Provenance" and _is_matched_patient(ctx, ref):
            return False
        encounter_known |= ref.startswith("Encounter/")
    if (
        ctx.caps.requires_existing_encounter
        and not encounter_known
        and item.rtype not in _NO_ENCOUNTER_NEEDED
    ):
        return False
    for ref in refs:
        if ref in ctx.items and ctx.items[ref].action == "write":
            item.deps.add(ref)  # PUT in this plan: known id, but written first
    body = _copy(item.due.resource)
    if item.action == "update":
        assert item.delivered is not None
        body["id"] = item.delivered.split("/", 1)[1]
    item.body = body
    return True


def _is_matched_patient(ctx: _Ctx, ref: str) -> bool:
    return ref == ctx.patient_key and ctx.target.patient_identifier is not None


def _note_encounter(ctx: _Ctx, item: _Item) -> tuple[str | None, str | None]:
    """(the encounter reference for the note's context, or a wait reason)."""
    resource = item.due.resource
    if item.rtype == "Encounter":
        candidates = [item.key]
    else:
        candidates = [
            r
            for r in (
                (resource.get("encounter") or {}).get("reference"),
                (resource.get("context") or {}).get("reference"),
            )
            if isinstance(r, str) and r.startswith("Encounter/")
        ]
    for ref in candidates:
        if ref == item.key:
            known = ctx.encounter_refs.get(ref)
            if known is None and (ctx.server_refs.get(ref) or "").startswith("Encounter/"):
                known = ctx.server_refs[ref]
            if known is not None:
                return known, None
            if ctx.caps.requires_existing_encounter:
                return None, "no matching encounter on target"
            return None, None
        kind, value = _status(ctx, ref)
        if kind == "known":
            return value, None
        if kind == "wait":
            return None, value
        if kind == "pending":
            item.deps.add(ref)
            item.pending.add(ref)
            return ref, None
    return None, None


def _resolve_note(ctx: _Ctx, item: _Item) -> None:
    if item.action != "note":
        return
    doc_caps = ctx.caps.of("DocumentReference")
    renote = item.delivered is not None and item.delivered.startswith("DocumentReference/")
    if renote and not doc_caps.update:
        item.action = "skip"
        item.reason = "an earlier version went as a note, and the target cannot update notes"
        return
    if not renote and not doc_caps.writable:
        item.action = "skip"
        item.reason += "; the target cannot take DocumentReference notes either"
        return
    if ctx.patient_ref is None and ctx.patient_key is not None:
        kind, value = _status(ctx, ctx.patient_key)
        if kind in ("wait", "absent"):
            item.action = "wait" if kind == "wait" else "skip"
            item.reason = f"the note needs the patient on the target ({value})"
            return
        if kind == "pending":  # our Patient is POSTed earlier in this plan
            item.deps.add(ctx.patient_key)
            item.pending.add(ctx.patient_key)
        elif ctx.items.get(ctx.patient_key) is not None:
            item.deps.add(ctx.patient_key)
        patient = value
    elif ctx.patient_ref is not None:
        patient = ctx.patient_ref
    else:
        item.action, item.reason = "skip", "no patient to file a note under"
        return
    encounter, wait = _note_encounter(ctx, item)
    if wait is not None:
        item.action, item.reason = "wait", wait
        return
    if encounter is None and ctx.caps.requires_existing_encounter:
        item.action, item.reason = "skip", _NO_ENCOUNTER
        return
    note = note_for(
        item.due.resource, patient_ref=patient, encounter_ref=encounter, lookup=ctx.lookup
    )
    if renote:
        assert item.delivered is not None
        note["id"] = item.delivered.split("/", 1)[1]
        item.mode = None
    else:
        item.mode = _mode(ctx, "DocumentReference", note)
        if item.mode == "PUT":
            note["id"] = str(uuid.uuid5(NOTE_NAMESPACE, f"{item.key}#note"))
    item.note = note


# ------------------------------------------------------------------------------ notes


def _text(concept: Any, *, prefer_display: bool = False) -> str | None:
    """Readable text of a CodeableConcept (text, else a coding's display, else its code)."""
    if not isinstance(concept, dict):
        return None
    if isinstance(concept.get("text"), str) and not prefer_display:
        return str(concept["text"])
    for coding in concept.get("coding") or []:
        if isinstance(coding, dict) and isinstance(coding.get("display"), str):
            return str(coding["display"])
    if isinstance(concept.get("text"), str):
        return str(concept["text"])
    for coding in concept.get("coding") or []:
        if isinstance(coding, dict) and isinstance(coding.get("code"), str):
            return str(coding["code"])
    return None


def _quantity(q: Any) -> str | None:
    if not isinstance(q, dict) or q.get("value") is None:
        return None
    unit = q.get("unit") or q.get("code") or ""
    return f"{q['value']} {unit}".strip()


def _period(p: Any) -> str | None:
    if not isinstance(p, dict):
        return None
    start, end = p.get("start"), p.get("end")
    if start and end:
        return f"{start} to {end}"
    return str(start or end) if (start or end) else None


def _ext_string(resource: JSON, suffix: str) -> str | None:
    for ext in resource.get("extension") or []:
        if isinstance(ext, dict) and str(ext.get("url", "")).endswith(suffix):
            for k, v in ext.items():
                if k.startswith("value") and isinstance(v, str | int):
                    return str(v)
    return None


def _dose_text(ma: JSON, lookup: Mapping[str, JSON]) -> str:
    substance = _text(ma.get("medicationCodeableConcept"))
    med_ref = (ma.get("medicationReference") or {}).get("reference")
    if substance is None and isinstance(med_ref, str) and med_ref in lookup:
        substance = _text(lookup[med_ref].get("code"))
    dosage = ma.get("dosage") or {}
    parts = [
        substance or "medication",
        _quantity(dosage.get("dose")),
        _text(dosage.get("route")),
        ma.get("effectiveDateTime") or _period(ma.get("effectivePeriod")),
    ]
    return ", ".join(str(p) for p in parts if p)


def _summary_lines(resource: JSON, lookup: Mapping[str, JSON]) -> tuple[str, list[str]]:
    """A title and readable lines for one record (the note's text)."""
    rtype = resource["resourceType"]
    lines: list[tuple[str, Any]] = []
    if rtype == "AdverseEvent":
        title = "Adverse event"
        lines += [
            # the coded term's display reads better than the source's free text (a code)
            ("Event", _text(resource.get("event"), prefer_display=True)),
            ("Onset", resource.get("date")),
            ("Severity", _text(resource.get("severity"))),
            ("Seriousness", _text(resource.get("seriousness"))),
            ("Outcome", _text(resource.get("outcome"))),
        ]
        for suspect in resource.get("suspectEntity") or []:
            ref = (suspect.get("instance") or {}).get("reference")
            what = (
                _dose_text(lookup[ref], lookup)
                if isinstance(ref, str) and ref in lookup
                else "a dose record"
            )
            causality = [
                ", ".join(
                    str(x) for x in (_text(c.get("assessment")), c.get("productRelatedness")) if x
                )
                for c in suspect.get("causality") or []
            ]
            cause = f" (causality: {'; '.join(c for c in causality if c)})" if causality else ""
            lines.append(("Suspect dose", f"{what}{cause}"))
        lines.append(("Description", _ext_string(resource, "adverse-event-description")))
    elif rtype == "MedicationAdministration":
        title = "Medication administration"
        dosage = resource.get("dosage") or {}
        med_ref = (resource.get("medicationReference") or {}).get("reference")
        substance = _text(resource.get("medicationCodeableConcept")) or (
            _text(lookup[med_ref].get("code"))
            if isinstance(med_ref, str) and med_ref in lookup
            else None
        )
        lines += [
            ("Substance", substance),
            ("Dose", _quantity(dosage.get("dose"))),
            ("Route", _text(dosage.get("route"))),
            ("Time", resource.get("effectiveDateTime") or _period(resource.get("effectivePeriod"))),
            ("Status", resource.get("status")),
            ("Dose kind", _ext_string(resource, "dose-kind")),
            ("Dosage note", dosage.get("text")),
        ]
    elif rtype == "Encounter":
        title = "Therapy session"
        types = [t for t in (_text(c) for c in resource.get("type") or []) if t]
        lines += [
            ("Session", "; ".join(types) or None),
            ("Session number", _ext_string(resource, "session-number")),
            ("Status", resource.get("status")),
            ("Period", _period(resource.get("period"))),
            (
                "Location",
                ", ".join(
                    str((loc.get("location") or {}).get("display"))
                    for loc in resource.get("location") or []
                    if (loc.get("location") or {}).get("display")
                )
                or None,
            ),
        ]
    elif rtype == "EpisodeOfCare":
        title = "Treatment course"
        types = [t for t in (_text(c) for c in resource.get("type") or []) if t]
        lines += [
            ("Course", "; ".join(types) or None),
            ("Status", resource.get("status")),
            ("Period", _period(resource.get("period"))),
        ]
    elif rtype == "Observation":
        title = "Observation"
        value = _quantity(resource.get("valueQuantity"))
        for key in ("valueString", "valueInteger", "valueBoolean"):
            if value is None and resource.get(key) is not None:
                value = str(resource[key])
        if value is None:
            value = _text(resource.get("valueCodeableConcept"))
        components = [
            f"{_text(c.get('code'))}: {_quantity(c.get('valueQuantity'))}"
            for c in resource.get("component") or []
            if isinstance(c, dict)
        ]
        lines += [
            ("What", _text(resource.get("code"))),
            ("Value", value),
            ("Components", "; ".join(components) or None),
            ("Time", resource.get("effectiveDateTime") or _period(resource.get("effectivePeriod"))),
            ("Timepoint", _ext_string(resource, "protocol-timepoint")),
            ("Status", resource.get("status")),
        ]
    elif rtype == "Procedure":
        title = "Procedure"
        lines += [
            ("Procedure", _text(resource.get("code"))),
            ("Status", resource.get("status")),
            (
                "Performed",
                resource.get("performedDateTime") or _period(resource.get("performedPeriod")),
            ),
        ]
    else:
        title = rtype
        lines += [("Status", resource.get("status"))]
    identity = _identity(resource)
    if identity is not None:
        lines.append(("Source record", f"{identity[0]}|{identity[1]}"))
    text = [f"{label}: {value}" for label, value in lines if value not in (None, "")]
    return title, text


def _note_date(resource: JSON) -> str | None:
    """The record's own time, when it is precise enough for DocumentReference.date (instant)."""
    candidates = (
        resource.get("date"),
        resource.get("effectiveDateTime"),
        resource.get("performedDateTime"),
        (resource.get("period") or {}).get("start"),
        (resource.get("performedPeriod") or {}).get("start"),
        (resource.get("effectivePeriod") or {}).get("start"),
        resource.get("recordedDate"),
    )
    for value in candidates:
        if isinstance(value, str) and _INSTANT.fullmatch(value):
            return value
    return None


def note_for(
    resource: JSON,
    *,
    patient_ref: str,
    encounter_ref: str | None = None,
    lookup: Mapping[str, JSON] | None = None,
) -> JSON:
    """The DocumentReference note that stands for ``resource`` on a target that cannot take it.

    ``type`` is text only (no LOINC note type is claimed); ``category`` is US Core's
    ``clinical-note``; the attachment is UTF-8 plain text. ``lookup`` (our ``Type/id`` →
    resource) lets the summary name a suspect dose's substance, amount and time.
    """
    lookup = lookup or {}
    title, lines = _summary_lines(resource, lookup)
    rtype = resource["resourceType"]
    identity = _identity(resource) or ("urn:fhirbridge:resource", f"{rtype}/{resource['id']}")
    text = "\n".join(
        [f"{title} (recorded by the MDMA-assisted therapy program; sent by fhirbridge)", *lines]
    )
    note: JSON = {"resourceType": "DocumentReference"}
    security = (resource.get("meta") or {}).get("security")
    if security:
        note["meta"] = {"security": copy.deepcopy(security)}
    note.update(
        {
            "identifier": [{"system": f"{identity[0]}#note", "value": identity[1]}],
            "status": "current",
            "type": {"text": f"{title} note"},
            "category": [
                {
                    "coding": [
                        {
                            "system": _US_CORE_DOC_CATEGORY,
                            "code": "clinical-note",
                            "display": "Clinical Note",
                        }
                    ]
                }
            ],
            "subject": {"reference": patient_ref},
        }
    )
    date = _note_date(resource)
    if date is not None:
        note["date"] = date
    note["description"] = f"{title}, sent as a note: this server does not accept {rtype}"
    if security:  # DocumentReference.securityLabel is CodeableConcept, meta.security Coding
        note["securityLabel"] = [{"coding": [copy.deepcopy(c)]} for c in security]
    note["content"] = [
        {
            "attachment": {
                "contentType": "text/plain; charset=utf-8",
                "data": base64.b64encode(text.encode("utf-8")).decode("ascii"),
                "title": f"{title} note",
            }
        }
    ]
    if encounter_ref is not None:
        note["context"] = {"encounter": [{"reference": encounter_ref}]}
    return note


# ------------------------------------------------------------------------------ steps


def _full_url(key: str) -> str:
    rid = key.split("/", 1)[1]
    try:
        return f"urn:uuid:{uuid.UUID(rid)}"
    except ValueError:
        return f"urn:uuid:{uuid.uuid5(NOTE_NAMESPACE, key)}"


def _if_match(ctx: _Ctx, item: _Item) -> str | None:
    ledger = item.due.ledger
    if not ctx.caps.versioned_update or ledger is None or ledger.server_version is None:
        return None
    return f'W/"{ledger.server_version}"'


def _entry(item: _Item, urn: Mapping[str, str]) -> Entry:
    assert item.body is not None and item.mode is not None
    body = item.body
    if urn and any(ref in urn for ref in references(body)):
        body = _copy(body)
        for path, ref in _ref_paths(body):
            if ref in urn:
                _set_ref(body, path, urn[ref])
    if item.mode == "PUT":
        return Entry(item.key, "PUT", item.key, body, _full_url(item.key))
    body = {k: v for k, v in body.items() if k != "id"}  # item.body is shared: no pop
    ine = None
    if item.mode == "POST_INE":
        system, value = _identity(item.due.resource) or ("", "")
        ine = f"identifier={system}|{value}"
    return Entry(
        item.key,
        "POST",
        item.rtype,
        body,
        _full_url(item.key),
        if_none_exist=ine,
        unverifiable_retry=item.mode == "POST",
    )


def _single(item: _Item, body: JSON, mode: _Mode, awaiting: tuple[str, ...]) -> Step:
    rtype = body["resourceType"]
    if mode == "SEARCH":
        system, value = _identity(body) or ("", "")
        body = {k: v for k, v in body.items() if k != "id"}
        return SearchThenCreate(item.key, rtype, f"{system}|{value}", body, awaiting)
    if mode == "PUT":
        return Single(item.key, "PUT", f"{rtype}/{body['id']}", body, awaiting=awaiting)
    body = {k: v for k, v in body.items() if k != "id"}
    if mode == "POST_INE":
        system, value = _identity(body) or ("", "")
        return Single(
            item.key,
            "POST",
            rtype,
            body,
            if_none_exist=f"identifier={system}|{value}",
            awaiting=awaiting,
        )
    return Single(item.key, "POST", rtype, body, unverifiable_retry=True, awaiting=awaiting)


def _note_step(ctx: _Ctx, item: _Item) -> Fallback:
    assert item.note is not None
    awaiting = tuple(sorted(item.pending))
    write: _NoteWrite
    if item.mode is None:  # update of a note already on the target
        assert item.delivered is not None
        write = Update(
            item.key, item.delivered, item.note, if_match=_if_match(ctx, item), awaiting=awaiting
        )
    else:
        step = _single(item, item.note, item.mode, awaiting)
        assert isinstance(step, Single | SearchThenCreate)
        write = step
    return Fallback(item.key, "note", item.reason, item.note, write)


def _levels(ctx: _Ctx, ordered: list[_Item], group: Mapping[str, int]) -> None:
    """Level of each active item: one more than the deepest in-plan write it depends on.

    The members of one transaction chunk (``group``) share the chunk's level; they depend only
    on members (see ``_steps``), so chunk levels are settled first.
    """
    chunk_level: dict[int, int] = {}
    for item in ordered:
        if item.key in group:
            g = group[item.key]
            level = chunk_level.get(g, 0)
            for dep in item.deps:
                if group.get(dep, g) != g:
                    level = max(level, chunk_level.get(group[dep], 0) + 1)
            chunk_level[g] = level
    for item in ordered:
        if item.key in group:
            item.level = chunk_level[group[item.key]]
        elif item.action in ("write", "update", "note"):
            item.level = max((ctx.items[d].level + 1 for d in item.deps), default=0)


def _steps(ctx: _Ctx, ordered: list[_Item]) -> list[Step]:
    caps, target = ctx.caps, ctx.target
    active = [i for i in ordered if i.action in ("write", "update", "note")]
    # Transaction members: idempotent creates whose pending references stay inside the
    # transaction; a member that must await a write outside it is demoted to a single step.
    members: list[_Item] = []
    if caps.transaction:
        candidates = {
            i.key for i in active if i.action == "write" and i.mode in ("PUT", "POST_INE")
        }
        changed = True
        while changed:
            changed = False
            for key in sorted(candidates):
                if any(d not in candidates for d in ctx.items[key].deps):
                    candidates.discard(key)
                    changed = True
        members = [i for i in active if i.key in candidates]
    group: dict[str, int] = {}
    for n, item in enumerate(members):
        group[item.key] = n // target.batch_size
    _levels(ctx, ordered, group)

    placed: list[tuple[int, int, Step]] = []
    # transactions
    chunks: dict[int, list[_Item]] = {}
    for item in members:
        chunks.setdefault(group[item.key], []).append(item)
    for items in chunks.values():
        inside = {i.key for i in items}
        urn = {k: _full_url(k) for i in items for k in i.pending if k in inside}
        awaiting = sorted({p for i in items for p in i.pending if p not in inside})
        transaction = Transaction(tuple(_entry(i, urn) for i in items), tuple(awaiting))
        placed.append((items[0].level, items[0].order, transaction))
    # batches: per level, the PUT / conditional / plain POST creates
    batched: dict[int, list[_Item]] = {}
    if caps.batch and not caps.transaction:
        for item in active:
            if item.action == "write" and item.mode in ("PUT", "POST_INE", "POST"):
                batched.setdefault(item.level, []).append(item)
    for level, items in batched.items():
        for start in range(0, len(items), target.batch_size):
            chunk = items[start : start + target.batch_size]
            awaiting = sorted({p for i in chunk for p in i.pending})
            batch = Batch(tuple(_entry(i, {}) for i in chunk), tuple(awaiting), level)
            placed.append((level, chunk[0].order, batch))
    in_bundle = set(group) | {i.key for items in batched.values() for i in items}
    # one step each for the rest
    for item in ordered:
        step_: Step | None = None
        if item.action == "done" or item.key in in_bundle:
            continue
        awaiting_ = tuple(sorted(item.pending))
        if item.action == "write":
            assert item.body is not None and item.mode is not None
            step_ = _single(item, item.body, item.mode, awaiting_)
        elif item.action == "update":
            assert item.body is not None and item.delivered is not None
            step_ = Update(item.key, item.delivered, item.body, _if_match(ctx, item), awaiting_)
        elif item.action == "note":
            step_ = _note_step(ctx, item)
        elif item.action in ("skip", "matched"):
            step_ = Fallback(item.key, "skip", item.reason)
        else:
            step_ = Wait(item.key, item.reason)
        # skips and waits go after the writes, in dependency order
        level = item.level if item.action in ("write", "update", "note") else 1 << 30
        placed.append((level, item.order, step_))
    placed.sort(key=lambda p: (p[0], p[1]))
    return [s for _, _, s in placed]
