"""Terminology tables as FHIR R4 (4.0.1) ConceptMap resources (pure: no I/O, no clock).

Which tables become a ConceptMap
    A table whose every row is a *code*: a Coding ``{system, code, display?}``, a
    CodeableConcept-like ``{coding: [...], text?}`` (each coding is a target), or, only when the
    table declares ``target_system``, a plain string taken as a code of that system. Value tables
    whose rows are plain values with no declared ``target_system`` (``encounter-status``,
    ``procedure-status``: local status → FHIR status code) say nothing about code systems and
    are not ConceptMaps; ``table_to_conceptmap`` answers None for them (and ``value_tables``
    names them, so callers can report them rather than drop them silently).

Where the systems go
    R4 ``ConceptMap.source[x]`` / ``target[x]`` (uri | canonical) identify the source / target
    *value set* that gives the mapping its context; ``group.source`` / ``group.target`` are
    "an absolute URI that identifies the source [target] system where the concepts ... are
    defined" (R4 conceptmap-definitions; the same text is in the shipped official R4 JSON
    Schema, ``fhirbridge/schemas/fhir.schema.json``, ``ConceptMap_Group``). A table declares
    code *systems* (``source_system``, ``target_system``), not value sets, so the systems go to
    ``group.source`` / ``group.target`` and ``sourceUri`` / ``targetUri`` are omitted (0..1).

Groups and equivalence
    One group per (source system, target system, target version): a row whose coding has a
    system other than the table's ``target_system`` lands in its own group (so ``instruments``
    has a LOINC group and a local-instrument group). The ``text`` of a CodeableConcept-like row
    becomes ``element.display`` (it names the local concept). Within the table, a target code
    reached from one local code is ``equivalent`` (R4 ConceptMapEquivalence; R5 renamed the
    element ``relationship``). A target code reached from several local codes (``physician``,
    ``nurse``, ``rater`` → v3-ParticipationType ``PART``) cannot be equivalent to each of them:
    it is ``wider`` ("the target mapping is wider in meaning than the source concept"), with a
    comment saying so.

Unmapped local terms: no ``group.unmapped``
    R4 ``group.unmapped.mode`` is ``provided`` ("use the code as provided in the $translate
    request"), ``fixed`` (one fixed target code) or ``other-map`` (another ConceptMap). None
    describes what fhirbridge does with a local term a table does not list: it keeps the term as
    *text*, gives it *no* code, and counts it as unmapped (``unmappedTerms`` in the submission
    summary, a note from ``fhirbridge map``). ``provided`` would claim the local term is a valid
    code of the target system (it is not: "jaw-clenching" is no SNOMED CT code), ``fixed`` would
    invent a code. So ``unmapped`` is omitted (a ``$translate`` of an unlisted code finds no
    match), and the rule is stated in ``ConceptMap.purpose``.

Identity
    id = UUIDv5(pack identity namespace, ``conceptmap|<table>``), url
    ``urn:fhirbridge:ConceptMap:<table>``, version = the pack version: the same pack gives the
    same resources, byte for byte, on every run and every server.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from fhirbridge.mapping.expr import Table
    from fhirbridge.mapping.pack import MappingPack

__all__ = [
    "CONCEPTMAP_URL_PREFIX",
    "collection_bundle",
    "conceptmap_id",
    "conceptmap_name",
    "pack_conceptmaps",
    "table_to_conceptmap",
    "value_tables",
]

CONCEPTMAP_URL_PREFIX: Final = "urn:fhirbridge:ConceptMap:"
PUBLISHER: Final = "fhirbridge"
_CODING_KEYS: Final = frozenset({"system", "version", "code", "display", "userSelected"})
_CONCEPT_KEYS: Final = frozenset({"coding", "text"})
_WORD = re.compile(r"[A-Za-z0-9]+")

# (system, version) of a group's target; None when the coding has none.
_TargetKey = tuple[str | None, str | None]
# One mapping: source code → (target system/version, target code, target display)
_Mapping = tuple[str, _TargetKey, str, str | None]


def conceptmap_id(pack: MappingPack, table_name: str) -> str:
    """The deterministic logical id of the ConceptMap of ``table_name`` in ``pack``."""
    return str(uuid.uuid5(pack.identity.namespace, f"conceptmap|{table_name}"))


def conceptmap_name(table_name: str) -> str:
    """A computable name (R4 cmd-0: ``[A-Z]([A-Za-z0-9_]){0,254}``): ``adverse-event-terms`` →
    ``AdverseEventTerms``."""
    name = "".join(w[:1].upper() + w[1:] for w in _WORD.findall(table_name))
    if not name or not name[0].isalpha():
        name = "Table" + name
    return name[:255]


def _title(table_name: str) -> str:
    words = table_name.replace("-", " ").strip()
    return (words[:1].upper() + words[1:]) or table_name


def _coding(value: Any) -> dict[str, Any] | None:
    """``value`` as a Coding with a non-empty code, else None."""
    if not isinstance(value, Mapping) or not set(value) <= _CODING_KEYS:
        return None
    code = value.get("code")
    if not isinstance(code, str) or not code:
        return None
    if any(not isinstance(value.get(k, ""), str) for k in ("system", "version", "display")):
        return None
    return dict(value)


def _row_codings(value: Any, target_system: str | None) -> list[dict[str, Any]] | None:
    """The target codings of one row, or None when the row is not a code."""
    coding = _coding(value)
    if coding is not None:
        return [coding]
    if isinstance(value, Mapping) and "coding" in value and set(value) <= _CONCEPT_KEYS:
        items = value["coding"]
        if not isinstance(items, list) or not items:
            return None
        codings = [_coding(item) for item in items]
        if any(c is None for c in codings):
            return None
        return [c for c in codings if c is not None]
    if isinstance(value, str) and value and target_system:
        return [{"system": target_system, "code": value}]
    return None


def _source_display(value: Any) -> str | None:
    """The text of a CodeableConcept-like row: it names the local concept."""
    text = value.get("text") if isinstance(value, Mapping) and "coding" in value else None
    if not isinstance(text, str):
        return None
    return " ".join(text.split()) or None


def _mappings(table: Table) -> list[_Mapping] | None:
    """Every (source code, target) pair of the table in row order; None for a value table."""
    out: list[_Mapping] = []
    for key, value in table.rows.items():
        codings = _row_codings(value, table.target_system)
        if codings is None:
            return None
        for coding in codings:
            target: _TargetKey = (coding.get("system"), coding.get("version"))
            out.append((key, target, coding["code"], coding.get("display")))
    return out


def _group_order(mappings: list[_Mapping], target_system: str | None) -> list[_TargetKey]:
    """The table's own target system first, then the others as they first appear."""
    seen: dict[_TargetKey, None] = {}
    for _, target, _, _ in mappings:
        seen.setdefault(target, None)
    keys = list(seen)
    keys.sort(key=lambda k: 0 if k[0] == target_system and target_system is not None else 1)
    return keys


def _element(key: str, row: Any, targets: list[dict[str, Any]]) -> dict[str, Any]:
    element: dict[str, Any] = {"code": key}
    display = _source_display(row)
    if display:
        element["display"] = display
    element["target"] = targets
    return element


def table_to_conceptmap(table: Table, pack: MappingPack) -> dict[str, Any] | None:
    """The R4 ConceptMap of a code table, or None for a value table (see the module doc)."""
    mappings = _mappings(table)
    if not mappings:
        return None
    # How many distinct local codes reach each target code (many-to-one → "wider").
    sources_of: dict[tuple[_TargetKey, str], set[str]] = {}
    for key, target, code, _ in mappings:
        sources_of.setdefault((target, code), set()).add(key)

    groups: list[dict[str, Any]] = []
    for group_key in _group_order(mappings, table.target_system):
        system, version = group_key
        elements: dict[str, list[dict[str, Any]]] = {}
        for key, target, code, display in mappings:
            if target != group_key:
                continue
            mapped: dict[str, Any] = {"code": code}
            if display:
                mapped["display"] = display
            shared = len(sources_of[(target, code)])
            if shared > 1:
                mapped["equivalence"] = "wider"
                mapped["comment"] = (
                    f"{shared} local codes map to this code: it is wider in meaning than each"
                )
            else:
                mapped["equivalence"] = "equivalent"
            targets = elements.setdefault(key, [])
            if mapped not in targets:
                targets.append(mapped)
        group: dict[str, Any] = {}
        if table.source_system:
            group["source"] = table.source_system
        if system:
            group["target"] = system
        if version:
            group["targetVersion"] = version
        group["element"] = [_element(key, table.rows[key], ts) for key, ts in elements.items()]
        groups.append(group)

    resource: dict[str, Any] = {
        "resourceType": "ConceptMap",
        "id": conceptmap_id(pack, table.name),
        "url": CONCEPTMAP_URL_PREFIX + table.name,
        "version": pack.version,
        "name": conceptmap_name(table.name),
        "title": _title(table.name),
        "status": "active",
        "publisher": PUBLISHER,
    }
    description = " ".join(table.description.split())
    if description:
        resource["description"] = description
    resource["purpose"] = (
        f"The mapping table `{table.name}` ({table.file}) of mapping pack {pack.name} "
        f"v{pack.version}, as fhirbridge applies it with `$lookup`. A local code this map does "
        "not list has no target: fhirbridge keeps it as text, never gives it a code, and counts "
        "it as unmapped (`unmappedTerms` in the submission summary). That is why no group has "
        "an `unmapped` element (no R4 unmapped mode means 'keep as text')."
    )
    resource["group"] = groups
    return resource


def pack_conceptmaps(pack: MappingPack) -> list[dict[str, Any]]:
    """The ConceptMaps of every code table of the pack, ordered by table name."""
    out: list[dict[str, Any]] = []
    for name in sorted(pack.tables):
        conceptmap = table_to_conceptmap(pack.tables[name], pack)
        if conceptmap is not None:
            out.append(conceptmap)
    return out


def value_tables(pack: MappingPack) -> list[str]:
    """Names of the tables that are not code tables (no ConceptMap), sorted."""
    return sorted(n for n, t in pack.tables.items() if table_to_conceptmap(t, pack) is None)


def collection_bundle(resources: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """A Bundle of type collection (fullUrl ``urn:uuid:<id>``: the ids are UUIDs)."""
    entries = [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in resources]
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "collection"}
    if entries:
        bundle["entry"] = entries
    return bundle
