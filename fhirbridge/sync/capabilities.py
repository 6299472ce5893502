"""What a target accepts: per-type interactions and system-level bundle support. Pure data.

Four sources, chosen by ``Target.profile``:

- ``generic-r4``, ``epic``, ``oracle-health``: the shipped ``profiles/<name>.yaml`` (package
  data), loaded by :func:`load_profile`. The vendor profiles encode the sandbox
  CapabilityStatements summarised in REFERENCE.md §4-5 (each file cites its capture). Sandbox
  capabilities are a ceiling: a health system switches on a subset.
- ``auto``: :func:`from_capability_statement` reads the target's own ``/metadata``.

Two R4 facts override every source (see :data:`NO_IDENTIFIER_SEARCH`): AdverseEvent has no
``identifier`` search parameter in R4 (4.0.1) and Provenance has no identifier at all, so neither
can be searched or conditionally created by identifier, whatever a server advertises. sekmet-fhir
shows why this matters: ``AdverseEvent?identifier=...`` answers 200 with *every* AdverseEvent
(the unknown parameter is ignored), and POST + If-None-Exist on AdverseEvent is a 400.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from types import MappingProxyType
from typing import Any, Final

import yaml

__all__ = [
    "NO_IDENTIFIER_SEARCH",
    "PROFILES",
    "Capabilities",
    "CapabilityError",
    "TypeCaps",
    "from_capability_statement",
    "load_profile",
]

#: Profiles shipped as ``fhirbridge/sync/profiles/<name>.yaml``.
PROFILES: Final = ("generic-r4", "epic", "oracle-health")

#: R4 (4.0.1) types that cannot be searched by identifier: AdverseEvent has no ``identifier``
#: search parameter, Provenance has no ``identifier`` element.
NO_IDENTIFIER_SEARCH: Final = frozenset({"AdverseEvent", "Provenance"})

_CAP_NAMES: Final = (
    "read",
    "search_identifier",
    "create",
    "update",
    "update_create",
    "conditional_create",
)


class CapabilityError(ValueError):
    """A profile file or a CapabilityStatement cannot be read as capabilities."""


@dataclass(frozen=True, slots=True)
class TypeCaps:
    """What a target does with one resource type.

    ``update_create``: PUT to a client-chosen id creates the resource (idempotent writes).
    ``conditional_create``: POST with If-None-Exist is honoured.
    ``search_identifier``: ``Type?identifier=system|value`` finds exactly the matches.
    """

    read: bool = False
    search_identifier: bool = False
    create: bool = False
    update: bool = False
    update_create: bool = False
    conditional_create: bool = False

    @classmethod
    def full(cls) -> TypeCaps:
        return cls(True, True, True, True, True, True)

    @classmethod
    def from_names(cls, names: Iterable[str]) -> TypeCaps:
        names = list(names)
        unknown = sorted(set(names) - set(_CAP_NAMES))
        if unknown:
            raise CapabilityError(f"unknown capability {', '.join(unknown)}")
        return cls(**{n: True for n in names})

    @property
    def writable(self) -> bool:
        """Whether a resource of this type can be put on the target at all."""
        return self.create or self.update_create

    def names(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name)]

    def meet(self, other: TypeCaps) -> TypeCaps:
        """What both support."""
        return TypeCaps(*(getattr(self, n) and getattr(other, n) for n in _CAP_NAMES))

    def r4_normalized(self, resource_type: str) -> TypeCaps:
        if resource_type in NO_IDENTIFIER_SEARCH:
            return replace(self, search_identifier=False, conditional_create=False)
        return self


@dataclass(frozen=True, slots=True)
class Capabilities:
    """A target's write surface as the planner sees it.

    ``types`` lists what the source names; :meth:`of` answers for any type, using ``unlisted``
    for the others and applying the R4 facts of :data:`NO_IDENTIFIER_SEARCH`.
    ``versioned_update``: PUT honours If-Match (a stale version is refused, not overwritten).
    ``requires_existing_encounter``: clinical writes must reference an Encounter that already
    exists on the target, and Encounters cannot be created there (Epic).
    """

    name: str
    transaction: bool = False
    batch: bool = False
    versioned_update: bool = False
    requires_existing_encounter: bool = False
    types: Mapping[str, TypeCaps] = field(default_factory=lambda: MappingProxyType({}))
    unlisted: TypeCaps = TypeCaps()
    notes: tuple[str, ...] = ()
    source: str = ""

    def of(self, resource_type: str) -> TypeCaps:
        caps = self.types.get(resource_type, self.unlisted)
        return caps.r4_normalized(resource_type)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "transaction": self.transaction,
            "batch": self.batch,
            "versionedUpdate": self.versioned_update,
            "requiresExistingEncounter": self.requires_existing_encounter,
            "types": {t: self.of(t).names() for t in sorted(self.types)},
            "unlisted": self.unlisted.names(),
            "notes": list(self.notes),
            "source": self.source,
        }


# --------------------------------------------------------------------------------------------
# Shipped profiles
# --------------------------------------------------------------------------------------------


def load_profile(name: str) -> Capabilities:
    """The shipped profile ``name`` (one of :data:`PROFILES`)."""
    if name not in PROFILES:
        raise CapabilityError(f"no shipped profile {name!r} (have {', '.join(PROFILES)})")
    text = (resources.files("fhirbridge.sync") / "profiles" / f"{name}.yaml").read_text("utf-8")
    return parse_profile(yaml.safe_load(text), name)


_PROFILE_KEYS: Final = frozenset(
    {
        "name",
        "source",
        "transaction",
        "batch",
        "versioned_update",
        "requires_existing_encounter",
        "types",
        "unlisted",
        "notes",
    }
)


def parse_profile(data: Any, name: str) -> Capabilities:
    """Capabilities from a parsed profile document (the shape of ``profiles/*.yaml``)."""
    if not isinstance(data, dict):
        raise CapabilityError(f"profile {name}: must be a mapping")
    unknown = sorted(set(data) - _PROFILE_KEYS)
    if unknown:
        raise CapabilityError(f"profile {name}: unknown keys {', '.join(unknown)}")
    if data.get("name") != name:
        raise CapabilityError(f"profile {name}: 'name' must be {name!r}")
    flags = {}
    for key in ("transaction", "batch", "versioned_update", "requires_existing_encounter"):
        value = data.get(key, False)
        if not isinstance(value, bool):
            raise CapabilityError(f"profile {name}: {key} must be true or false")
        flags[key] = value
    raw_types = data.get("types", {})
    if not isinstance(raw_types, dict):
        raise CapabilityError(f"profile {name}: types must be a mapping")
    types = {}
    for rtype, names in raw_types.items():
        if not isinstance(names, list):
            raise CapabilityError(f"profile {name}: types.{rtype} must be a list")
        try:
            types[str(rtype)] = TypeCaps.from_names(names)
        except CapabilityError as exc:
            raise CapabilityError(f"profile {name}: types.{rtype}: {exc}") from None
    unlisted = data.get("unlisted", [])
    if not isinstance(unlisted, list):
        raise CapabilityError(f"profile {name}: unlisted must be a list")
    notes = data.get("notes") or []
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise CapabilityError(f"profile {name}: notes must be a list of strings")
    return Capabilities(
        name=name,
        types=MappingProxyType(types),
        unlisted=TypeCaps.from_names(unlisted),
        notes=tuple(notes),
        source=str(data.get("source", "")),
        **flags,
    )


# --------------------------------------------------------------------------------------------
# CapabilityStatement (profile `auto`)
# --------------------------------------------------------------------------------------------


def from_capability_statement(cs: Mapping[str, Any]) -> Capabilities:
    """Capabilities from a server's CapabilityStatement (``GET <base>/metadata``).

    Per listed type: ``read``/``create``/``update`` from ``interaction.code``;
    ``search_identifier`` from ``search-type`` plus an ``identifier`` search parameter (when the
    type lists its parameters at all; R4 defines ``identifier`` for every type we produce except
    those of :data:`NO_IDENTIFIER_SEARCH`); ``update_create`` from ``updateCreate`` with
    ``update``; ``conditional_create`` from ``conditionalCreate`` with ``create``.
    System level: ``transaction``/``batch`` from ``rest.interaction``; ``versioned_update`` when
    every type that can be updated declares ``versioning: versioned-update``.

    A type the statement does not list is *not* taken as unsupported when the server is a
    generic store: sekmet-fhir omits AdverseEvent and QuestionnaireResponse from its list yet
    stores, reads and PUTs them. ``unlisted`` is what every listed type supports (the meet), so
    a server that does everything on every listed type is assumed to do it on the others, and
    a vendor server that is selective (most types read-only) gets nothing for unlisted types.
    """
    if cs.get("resourceType") != "CapabilityStatement":
        raise CapabilityError("not a CapabilityStatement")
    rests = [r for r in cs.get("rest") or [] if isinstance(r, dict) and r.get("mode") == "server"]
    if not rests:
        raise CapabilityError("CapabilityStatement has no rest entry with mode 'server'")
    rest = rests[0]
    system = {i.get("code") for i in rest.get("interaction") or [] if isinstance(i, dict)}
    types: dict[str, TypeCaps] = {}
    versionings: list[str | None] = []
    for entry in rest.get("resource") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
            continue
        codes = {i.get("code") for i in entry.get("interaction") or [] if isinstance(i, dict)}
        params = entry.get("searchParam")
        has_identifier_param = (
            any(isinstance(p, dict) and p.get("name") == "identifier" for p in params)
            if isinstance(params, list) and params
            else True
        )
        caps = TypeCaps(
            read="read" in codes,
            search_identifier="search-type" in codes and has_identifier_param,
            create="create" in codes,
            update="update" in codes,
            update_create="update" in codes and entry.get("updateCreate") is True,
            conditional_create="create" in codes and entry.get("conditionalCreate") is True,
        )
        types[entry["type"]] = caps
        if caps.update:
            versionings.append(entry.get("versioning"))
    unlisted = TypeCaps()
    if types:
        caps_iter = iter(types.values())
        unlisted = next(caps_iter)
        for caps in caps_iter:
            unlisted = unlisted.meet(caps)
    raw_software = cs.get("software")
    software: Mapping[str, Any] = raw_software if isinstance(raw_software, dict) else {}
    label = " ".join(str(software.get(k)) for k in ("name", "version") if software.get(k))
    return Capabilities(
        name="auto",
        transaction="transaction" in system,
        batch="batch" in system,
        versioned_update=bool(versionings) and all(v == "versioned-update" for v in versionings),
        requires_existing_encounter=False,
        types=MappingProxyType(types),
        unlisted=unlisted,
        notes=(
            "read from the target's CapabilityStatement"
            + (f" ({label})" if label else "")
            + "; types it does not list get what every listed type supports",
        ),
        source="GET /metadata",
    )
