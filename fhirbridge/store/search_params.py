"""The search parameters we support, per resource type, as data, and the pure extraction of
index rows from a resource.

The same table drives the store (what gets indexed, how a query is matched) and the
CapabilityStatement (what is advertised), so the two cannot diverge. Names, types and
definitions follow the FHIR R4 (4.0.1) search parameter registry; the one parameter without an
R4 definition (AdverseEvent `identifier`) is advertised without one.

Paths are dotted element names from the resource root, choice types spelled out
(`effectiveDateTime`); lists are flattened on the way. A value's FHIR type is recognised by its
shape: a string (code / date), a Coding, CodeableConcept, Identifier, Period or Reference.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from fhirbridge.store.fhirdates import MAX_US, MIN_US, parse_range
from fhirbridge.store.schema import INDEXED_TEXT_LENGTH

__all__ = [
    "COMMON_PARAMS",
    "PARAMS",
    "REFERENCE_ROW",
    "SUPPORTED_TYPES",
    "IndexRow",
    "ParamType",
    "SearchParam",
    "compartment_params",
    "extract_index",
    "params_for",
    "parse_reference",
]

ParamType = Literal["token", "reference", "date"]

# Internal index rows (never a search parameter): one per literal reference in the resource.
REFERENCE_ROW = "~ref"

_SP = "http://hl7.org/fhir/SearchParameter/"

ID_RE = re.compile(r"[A-Za-z0-9\-.]{1,64}", re.ASCII)
# Type/id, optionally behind a base URL and followed by /_history/vid.
_REFERENCE_RE = re.compile(
    r"(?:.*/)?(?P<type>[A-Z][A-Za-z]{0,63})/(?P<id>[A-Za-z0-9\-.]{1,64})"
    r"(?:/_history/[A-Za-z0-9\-.]{1,64})?",
    re.ASCII,
)


@dataclass(frozen=True, slots=True)
class SearchParam:
    """One supported search parameter of one resource type."""

    name: str
    type: ParamType
    paths: tuple[str, ...]
    definition: str | None
    documentation: str
    targets: tuple[str, ...] = ()  # reference: the types it may point to (empty: any type)
    compartment: bool = False  # a reference to a Patient puts the resource in its compartment
    column: str | None = None  # _id / _lastUpdated: read from the resource row, not the index


@dataclass(frozen=True, slots=True)
class IndexRow:
    """One search-index row of a resource (its type and id are added by the store)."""

    param: str
    system: str | None = None
    value: str | None = None
    date_lo: int | None = None
    date_hi: int | None = None
    ref: str | None = None

    def columns(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        """The row as fhir_search_index's column values, for the resource it belongs to."""
        return {
            "resource_type": resource_type,
            "resource_id": resource_id,
            "param": self.param,
            "system": self.system,
            "value": self.value,
            "date_lo": self.date_lo,
            "date_hi": self.date_hi,
            "ref": self.ref,
        }


COMMON_PARAMS: tuple[SearchParam, ...] = (
    SearchParam("_id", "token", (), _SP + "Resource-id", "Logical id of the resource", column="id"),
    SearchParam(
        "_lastUpdated",
        "date",
        (),
        _SP + "Resource-lastUpdated",
        "When the resource version last changed (meta.lastUpdated)",
        column="last_updated",
    ),
)


def _identifier(definition: str | None, rtype: str) -> SearchParam:
    return SearchParam(
        "identifier", "token", ("identifier",), definition, f"{rtype}.identifier (system|value)"
    )


def _patient(path: str, rtype: str, definition: str = _SP + "clinical-patient") -> SearchParam:
    return SearchParam(
        "patient",
        "reference",
        (path,),
        definition,
        f"{rtype}.{path} where it is a Patient",
        targets=("Patient",),
        compartment=True,
    )


def _subject(rtype: str, *, compartment: bool = False) -> SearchParam:
    return SearchParam(
        "subject",
        "reference",
        ("subject",),
        f"{_SP}{rtype}-subject",
        f"{rtype}.subject",
        compartment=compartment,
    )


def _encounter(rtype: str) -> SearchParam:
    return SearchParam(
        "encounter",
        "reference",
        ("encounter",),
        _SP + "clinical-encounter",
        f"{rtype}.encounter",
        targets=("Encounter",),
    )


def _code(path: str, rtype: str, name: str = "code", definition: str | None = None) -> SearchParam:
    return SearchParam(
        name, "token", (path,), definition or _SP + "clinical-code", f"{rtype}.{path}"
    )


def _date(
    paths: tuple[str, ...], rtype: str, name: str = "date", definition: str | None = None
) -> SearchParam:
    return SearchParam(
        name,
        "date",
        paths,
        definition or _SP + "clinical-date",
        " | ".join(f"{rtype}.{p}" for p in paths),
    )


PARAMS: Mapping[str, tuple[SearchParam, ...]] = MappingProxyType(
    {
        "Patient": (_identifier(_SP + "Patient-identifier", "Patient"),),
        "Practitioner": (_identifier(_SP + "Practitioner-identifier", "Practitioner"),),
        "EpisodeOfCare": (
            _identifier(_SP + "clinical-identifier", "EpisodeOfCare"),
            _patient("patient", "EpisodeOfCare"),
            _date(("period",), "EpisodeOfCare"),
        ),
        "Encounter": (
            _identifier(_SP + "clinical-identifier", "Encounter"),
            _patient("subject", "Encounter"),
            _subject("Encounter"),
            _date(("period",), "Encounter"),
        ),
        "Procedure": (
            _identifier(_SP + "clinical-identifier", "Procedure"),
            _patient("subject", "Procedure"),
            _subject("Procedure"),
            _encounter("Procedure"),
            _code("code", "Procedure"),
            _date(("performedDateTime", "performedPeriod"), "Procedure"),
        ),
        "Medication": (
            _identifier(_SP + "Medication-identifier", "Medication"),
            _code("code", "Medication"),
        ),
        "MedicationAdministration": (
            _identifier(_SP + "clinical-identifier", "MedicationAdministration"),
            _patient("subject", "MedicationAdministration"),
            _subject("MedicationAdministration"),
            SearchParam(
                "context",
                "reference",
                ("context",),
                _SP + "MedicationAdministration-context",
                "MedicationAdministration.context (Encounter or EpisodeOfCare)",
                targets=("Encounter", "EpisodeOfCare"),
            ),
            _code("medicationCodeableConcept", "MedicationAdministration"),
            _date(
                ("effectiveDateTime", "effectivePeriod"),
                "MedicationAdministration",
                name="effective-time",
                definition=_SP + "MedicationAdministration-effective-time",
            ),
        ),
        "Observation": (
            _identifier(_SP + "clinical-identifier", "Observation"),
            _patient("subject", "Observation"),
            _subject("Observation"),
            _encounter("Observation"),
            _code("code", "Observation"),
            _code(
                "category", "Observation", name="category", definition=_SP + "Observation-category"
            ),
            _date(("effectiveDateTime", "effectivePeriod", "effectiveInstant"), "Observation"),
        ),
        "AdverseEvent": (
            _identifier(None, "AdverseEvent"),
            _subject("AdverseEvent", compartment=True),
            _date(("date",), "AdverseEvent", definition=_SP + "AdverseEvent-date"),
            _code("event", "AdverseEvent", name="event", definition=_SP + "AdverseEvent-event"),
        ),
        "Provenance": (
            _patient("target", "Provenance", definition=_SP + "Provenance-patient"),
            SearchParam(
                "target", "reference", ("target",), _SP + "Provenance-target", "Provenance.target"
            ),
            _date(
                ("recorded",), "Provenance", name="recorded", definition=_SP + "Provenance-recorded"
            ),
        ),
        # The audit trail (fhirbridge.audit); not in any Patient compartment on purpose.
        "AuditEvent": (
            _date(("recorded",), "AuditEvent", definition=_SP + "AuditEvent-date"),
            SearchParam(
                "agent",
                "reference",
                ("agent.who",),
                _SP + "AuditEvent-agent",
                "AuditEvent.agent.who as a literal reference (fhirbridge names its callers by "
                "identifier: search them with altid)",
            ),
            _code("agent.altId", "AuditEvent", name="altid", definition=_SP + "AuditEvent-altid"),
            SearchParam(
                "entity",
                "reference",
                ("entity.what",),
                _SP + "AuditEvent-entity",
                "AuditEvent.entity.what",
            ),
            _code("outcome", "AuditEvent", name="outcome", definition=_SP + "AuditEvent-outcome"),
            _code("type", "AuditEvent", name="type", definition=_SP + "AuditEvent-type"),
            _code("subtype", "AuditEvent", name="subtype", definition=_SP + "AuditEvent-subtype"),
            _code("action", "AuditEvent", name="action", definition=_SP + "AuditEvent-action"),
        ),
    }
)

SUPPORTED_TYPES: tuple[str, ...] = tuple(sorted(PARAMS))

_BY_NAME: Mapping[str, Mapping[str, SearchParam]] = MappingProxyType(
    {
        rtype: MappingProxyType({p.name: p for p in (*COMMON_PARAMS, *own)})
        for rtype, own in PARAMS.items()
    }
)


def params_for(rtype: str) -> Mapping[str, SearchParam]:
    """All search parameters of a supported type by name (the common ones included);
    empty for an unsupported type."""
    return _BY_NAME.get(rtype, MappingProxyType({}))


def compartment_params() -> dict[str, tuple[str, ...]]:
    """Per type, the parameters whose reference to a Patient places a resource in that
    Patient's compartment (the basis of Patient/$everything)."""
    out: dict[str, tuple[str, ...]] = {}
    for rtype, own in PARAMS.items():
        names = tuple(p.name for p in own if p.compartment)
        if names:
            out[rtype] = names
    return out


def parse_reference(reference: str) -> tuple[str, str] | None:
    """(type, id) of a literal reference — relative, absolute or versioned — else None
    (contained "#x", urn:uuid:, logical-only references)."""
    match = _REFERENCE_RE.fullmatch(reference)
    if match is None:
        return None
    return match["type"], match["id"]


def _children(node: Any, name: str) -> Iterator[Any]:
    if isinstance(node, list):
        for item in node:
            yield from _children(item, name)
    elif isinstance(node, dict):
        value = node.get(name)
        if isinstance(value, list):
            yield from value
        elif value is not None:
            yield value


def _walk(resource: Mapping[str, Any], path: str) -> Iterator[Any]:
    nodes: list[Any] = [resource]
    for name in path.split("."):
        nodes = [child for node in nodes for child in _children(node, name)]
    yield from nodes


def _cut(text: str) -> str:
    return text[:INDEXED_TEXT_LENGTH]


def _str_or_none(value: Any) -> str | None:
    return _cut(value) if isinstance(value, str) and value else None


def _token_rows(param: str, value: Any) -> Iterator[IndexRow]:
    if isinstance(value, bool):
        yield IndexRow(param, value="true" if value else "false")
    elif isinstance(value, str):
        if value:
            yield IndexRow(param, value=_cut(value))
    elif isinstance(value, dict):
        if "coding" in value:  # CodeableConcept
            for coding in value["coding"] if isinstance(value["coding"], list) else ():
                yield from _token_rows(param, coding)
        elif "code" in value:  # Coding
            code = _str_or_none(value.get("code"))
            if code is not None:
                yield IndexRow(param, system=_str_or_none(value.get("system")), value=code)
        elif "value" in value:  # Identifier
            ident = _str_or_none(value.get("value"))
            if ident is not None:
                yield IndexRow(param, system=_str_or_none(value.get("system")), value=ident)


def _range(text: Any, *, upper: bool) -> int | None:
    if not isinstance(text, str):
        return None
    try:
        lo, hi = parse_range(text)
    except ValueError:
        return None  # not indexable; validated output never gets here
    return hi if upper else lo


def _date_rows(param: str, value: Any) -> Iterator[IndexRow]:
    if isinstance(value, str):
        try:
            lo, hi = parse_range(value)
        except ValueError:
            return
        yield IndexRow(param, date_lo=lo, date_hi=hi)
    elif isinstance(value, dict) and ("start" in value or "end" in value):  # Period
        start = _range(value.get("start"), upper=False)
        end = _range(value.get("end"), upper=True)
        if start is None and end is None:
            return
        yield IndexRow(
            param,
            date_lo=MIN_US if start is None else start,
            date_hi=MAX_US if end is None else end,
        )


def _reference_rows(sp: SearchParam, value: Any) -> Iterator[IndexRow]:
    if not isinstance(value, dict) or not isinstance(value.get("reference"), str):
        return
    parsed = parse_reference(value["reference"])
    if parsed is None:
        return
    rtype, rid = parsed
    if sp.targets and rtype not in sp.targets:
        return
    yield IndexRow(sp.name, value=rid, ref=f"{rtype}/{rid}")


def _all_references(resource: Mapping[str, Any]) -> Iterator[IndexRow]:
    stack: list[Any] = [resource]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            reference = node.get("reference")
            if isinstance(reference, str):
                parsed = parse_reference(reference)
                if parsed is not None:
                    rtype, rid = parsed
                    yield IndexRow(REFERENCE_ROW, system=rtype, value=rid, ref=f"{rtype}/{rid}")
            stack.extend(v for v in node.values() if isinstance(v, dict | list))
        elif isinstance(node, list):
            stack.extend(v for v in node if isinstance(v, dict | list))


def extract_index(resource: Mapping[str, Any]) -> list[IndexRow]:
    """The search-index rows of a resource: one per value of each of its type's parameters,
    plus one "~ref" row per distinct literal reference. Pure; unknown types get only the
    reference rows; values that cannot be indexed are skipped."""
    rows: list[IndexRow] = []
    for sp in PARAMS.get(str(resource.get("resourceType")), ()):
        for path in sp.paths:
            for value in _walk(resource, path):
                if sp.type == "token":
                    rows.extend(_token_rows(sp.name, value))
                elif sp.type == "date":
                    rows.extend(_date_rows(sp.name, value))
                else:
                    rows.extend(_reference_rows(sp, value))
    rows.extend(_all_references(resource))
    return list(dict.fromkeys(rows))
