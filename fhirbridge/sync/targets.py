"""Sync targets: the hospital FHIR servers fhirbridge delivers to, read from one YAML file.

The file is named by ``FHIRBRIDGE_TARGETS`` (see ``docs/targets.example.yaml``)::

    targets:
      - name: st-olaf-epic                      # slug: ledger rows and logs name it
        base_url: https://ehr.example.org/api/FHIR/R4
        profile: epic                           # auto | generic-r4 | epic | oracle-health
        auth: {type: smart_backend, client_id: "${EPIC_CLIENT_ID}", ...}
        patient_identifier: {system: "urn:oid:1.2.840.114350.1", source: mrn}

``${VAR}`` and ``${VAR:-default}`` are replaced in every string value (never in keys) from the
environment given to :func:`load_targets`; ``$${`` stands for a literal ``${``. A variable that is
not set (and has no default) is a configuration error naming the variable, the file and the line;
no error ever quotes a value, so a secret that came from the environment cannot leak through one.
``auth`` stays an opaque mapping here: ``fhirbridge.ehr.auth.parse_auth_config`` validates it
when the client is built; it is excluded from ``repr`` and from :meth:`Target.summary`.

Defaults that depend on the profile:

- ``create_patient``: true for ``generic-r4`` (and for ``auto`` without ``patient_identifier``),
  false for ``epic`` and ``oracle-health``, where the hospital owns patient registration: a
  patient that is not found on the target waits (visible in the ledger) instead of being created.
- ``fallbacks`` (what happens to a resource type the target cannot create): one rule for every
  profile, see :data:`NOTE_BY_DEFAULT` — clinical records become a DocumentReference note so that
  the hospital chart still shows them, reference and bookkeeping data (Practitioner, Medication,
  Provenance, ...) are skipped. The profiles differ in *which* types fall back, which is what
  their capabilities say. Both ``skip`` and ``note`` are recorded in the ledger, never silent.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fhirbridge.errors import MappingConfigError
from fhirbridge.fhir.validate import EMITTED_RESOURCE_TYPES
from fhirbridge.mapping.yamlsrc import escape_pointer_token, line_of, load_yaml

__all__ = [
    "NOTE_BY_DEFAULT",
    "PRODUCED_TYPES",
    "TARGETS_ENV",
    "FallbackAction",
    "PatientIdentifier",
    "Profile",
    "Target",
    "TargetConfigError",
    "TargetProblem",
    "load_targets",
    "substitute",
]

#: The environment variable that names the targets file.
TARGETS_ENV = "FHIRBRIDGE_TARGETS"

#: Resource types fhirbridge produces (the output Bundle itself is not delivered as such).
PRODUCED_TYPES: tuple[str, ...] = tuple(t for t in EMITTED_RESOURCE_TYPES if t != "Bundle")

#: Types that become a DocumentReference note when the target cannot create them: clinical
#: records a clinician should still find in the hospital chart. Every other type is skipped by
#: default: Practitioner and Medication are reference data the hospital keeps itself, Provenance
#: describes our import and means nothing next to records the target does not hold, and a note
#: about a note (DocumentReference) or about the patient (Patient) makes no sense.
NOTE_BY_DEFAULT: frozenset[str] = frozenset(
    {
        "AdverseEvent",
        "AllergyIntolerance",
        "CarePlan",
        "Condition",
        "Consent",
        "DiagnosticReport",
        "Encounter",
        "EpisodeOfCare",
        "Immunization",
        "MedicationAdministration",
        "MedicationRequest",
        "MedicationStatement",
        "Observation",
        "Procedure",
        "QuestionnaireResponse",
        "ServiceRequest",
    }
)
# A note about these could not say anything useful, so `note` is refused for them.
_NEVER_NOTED = frozenset({"Patient", "DocumentReference", "Provenance"})

Profile = Literal["auto", "generic-r4", "epic", "oracle-health"]
FallbackAction = Literal["skip", "note"]

_SLUG = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:\S+")
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# `$${` is an escaped `${`; `${...}` a reference; a `${` without `}` is malformed.
_REFERENCE = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TargetProblem:
    """One problem in the targets file: where (file:line, target) and what, never a value."""

    file: str
    message: str
    line: int | None = None
    target: str | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        who = f" target {self.target}:" if self.target else ""
        return f"{where}:{who} {self.message}"


@dataclass
class TargetConfigError(Exception):
    """The targets file failed to load; every problem names its file, line and target."""

    problems: list[TargetProblem] = field(default_factory=list)

    def __str__(self) -> str:
        return "targets file is invalid:\n" + "\n".join(f"  {p}" for p in self.problems)


class _UnsetVariable(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class _MalformedReference(Exception):
    pass


# --------------------------------------------------------------------------------------------
# ${VAR} substitution
# --------------------------------------------------------------------------------------------


def substitute(text: str, environ: Mapping[str, str]) -> str:
    """Replace ``${VAR}``/``${VAR:-default}`` in ``text``; ``$${`` gives a literal ``${``.

    ``${VAR:-default}`` uses the default when VAR is unset or empty (as in POSIX shells).
    Raises ``KeyError(name)`` for an unset variable without default and ``ValueError`` for a
    malformed reference; neither message contains a value.
    """
    try:
        return _substitute(text, environ)
    except _UnsetVariable as exc:
        raise KeyError(exc.name) from None
    except _MalformedReference:
        raise ValueError("malformed ${...} reference") from None


def _substitute(text: str, environ: Mapping[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        whole = match.group(0)
        if whole == "$${":
            return "${"
        inner = match.group(1)
        if inner is None:  # `${` never closed
            raise _MalformedReference
        name, sep, default = inner.partition(":-")
        if not _VAR_NAME.fullmatch(name):
            raise _MalformedReference
        value = environ.get(name)
        if sep:
            return value if value else default
        if value is None:
            raise _UnsetVariable(name)
        return value

    return _REFERENCE.sub(replace, text)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class PatientIdentifier(BaseModel):
    """How our Patient is found on the target: ``Patient?identifier=<system>|<our value>``.

    ``system`` is the hospital's MRN system URI; ``source`` names which of our Patient's
    identifiers carries the value (``mrn``: the identifier typed v2-0203 ``MR``, or whose system
    ends in ``:mrn``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    system: str
    source: Literal["mrn"] = "mrn"

    @field_validator("system")
    @classmethod
    def _check_system(cls, v: str) -> str:
        if not _URI.fullmatch(v):
            raise ValueError("must be an absolute URI (e.g. urn:oid:... or https://...)")
        return v


class Target(BaseModel):
    """One hospital FHIR server and what to send it."""

    # hide_input_in_errors: pydantic must not echo a value (auth holds secrets after ${VAR}).
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    name: str
    base_url: str
    profile: Profile
    auth: dict[str, Any] = Field(default_factory=lambda: {"type": "none"}, repr=False)
    resource_types: tuple[str, ...] = PRODUCED_TYPES
    fallbacks: dict[str, FallbackAction] = Field(default_factory=dict)
    patient_identifier: PatientIdentifier | None = None
    # The real default depends on the profile: see _default_create_patient.
    create_patient: bool = False
    ca_bundle: Path | None = None
    timeout: float = Field(default=30.0, gt=0, le=600)
    max_attempts: int = Field(default=8, ge=1, le=100)
    batch_size: int = Field(default=100, ge=1, le=1000)

    @model_validator(mode="before")
    @classmethod
    def _default_create_patient(cls, data: Any) -> Any:
        # The default depends on the profile (and on patient_identifier for `auto`).
        if isinstance(data, dict) and data.get("create_patient") is None:
            profile = data.get("profile")
            data = dict(data)
            data["create_patient"] = profile == "generic-r4" or (
                profile == "auto" and data.get("patient_identifier") is None
            )
        return data

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not _SLUG.fullmatch(v):
            raise ValueError(
                "must be a slug: lower-case letters, digits and '-', at most 63 characters"
            )
        return v

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http(s) URL with a host")
        if parts.username is not None or parts.password is not None:
            raise ValueError("must not carry credentials; configure them under auth")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query or a fragment")
        return v.rstrip("/")

    @field_validator("auth")
    @classmethod
    def _check_auth(cls, v: dict[str, Any]) -> dict[str, Any]:
        # Validated in full by fhirbridge.ehr.auth; here only what every auth mapping has.
        if not isinstance(v.get("type"), str):
            raise ValueError("needs a 'type' (none, bearer, client_secret_basic, smart_backend)")
        return v

    @field_validator("resource_types", mode="before")
    @classmethod
    def _check_resource_types(cls, v: Any) -> Any:
        if isinstance(v, list | tuple):
            if not v:
                raise ValueError("must list at least one resource type")
            unknown = [t for t in v if isinstance(t, str) and t not in PRODUCED_TYPES]
            if unknown:
                raise ValueError(
                    f"fhirbridge does not produce {', '.join(sorted(set(unknown)))} "
                    f"(it produces {', '.join(PRODUCED_TYPES)})"
                )
            if len(set(v)) != len(v):
                raise ValueError("lists a resource type twice")
            return tuple(v)
        return v

    @field_validator("fallbacks")
    @classmethod
    def _check_fallbacks(cls, v: dict[str, FallbackAction]) -> dict[str, FallbackAction]:
        for rtype, action in v.items():
            if rtype not in PRODUCED_TYPES:
                raise ValueError(f"fhirbridge does not produce {rtype}")
            if action == "note" and rtype in _NEVER_NOTED:
                raise ValueError(f"{rtype} cannot become a note; use skip")
        return v

    @field_validator("ca_bundle", mode="before")
    @classmethod
    def _empty_ca_bundle(cls, v: Any) -> Any:
        # `ca_bundle: ${CA_BUNDLE:-}` is how a file says "only when the variable is set"
        return None if v == "" else v

    @field_validator("ca_bundle")
    @classmethod
    def _check_ca_bundle(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError("is not a readable file")
        return v

    @model_validator(mode="after")
    def _check_patient_matching(self) -> Target:
        if not self.create_patient and self.patient_identifier is None:
            raise ValueError(
                "create_patient is false, so patient_identifier is needed to find the patient "
                "on the target"
            )
        return self

    def fallback(self, resource_type: str) -> FallbackAction:
        """What happens to ``resource_type`` where the target cannot create it."""
        configured = self.fallbacks.get(resource_type)
        if configured is not None:
            return configured
        return "note" if resource_type in NOTE_BY_DEFAULT else "skip"

    def routes(self, resource_type: str) -> bool:
        """Whether resources of this type are delivered to the target at all."""
        return resource_type in self.resource_types

    def summary(self) -> dict[str, Any]:
        """The configuration without secrets (auth shows its type only), for CLI and API."""
        data = self.model_dump(mode="json", exclude={"auth"})
        data["auth"] = {"type": self.auth.get("type")}
        data["fallbacks"] = {t: self.fallback(t) for t in self.resource_types}
        return data


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_targets(path: str | Path, environ: Mapping[str, str] = os.environ) -> list[Target]:
    """Read, substitute and validate the targets file; raise TargetConfigError with every problem.

    Relative ``ca_bundle`` paths are resolved against the file's directory.
    """
    path = Path(path)
    shown = str(path)
    try:
        data, lines = load_yaml(path, shown)
    except MappingConfigError as exc:  # the shared YAML reader's error, re-labelled
        raise TargetConfigError(
            [TargetProblem(p.file, p.message, p.line) for p in exc.problems]
        ) from None
    problems: list[TargetProblem] = []

    def problem(pointer: str, message: str, target: str | None = None) -> None:
        problems.append(TargetProblem(shown, message, line_of(lines, pointer), target))

    if not isinstance(data, dict) or not isinstance(data.get("targets"), list):
        problem("", "the file must be a mapping with a 'targets' list")
        raise TargetConfigError(problems)
    for key in data:
        if key != "targets":
            problem(f"/{escape_pointer_token(key)}", f"unknown top-level key {key!r}")

    targets: list[Target] = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(data["targets"]):
        pointer = f"/targets/{index}"
        label = f"#{index + 1}"
        if not isinstance(raw, dict):
            problem(pointer, "must be a mapping", label)
            continue
        if isinstance(raw.get("name"), str):
            label = raw["name"]
        before = len(problems)

        def report(where: str, message: str, who: str = label) -> None:
            problem(where, message, who)

        item = _substitute_tree(raw, pointer, environ, report)
        if len(problems) > before:
            continue
        bundle = item.get("ca_bundle")
        if isinstance(bundle, str) and bundle and not Path(bundle).is_absolute():
            item["ca_bundle"] = str(path.parent / item["ca_bundle"])
        try:
            target = Target.model_validate(item)
        except ValidationError as exc:
            for err in exc.errors(include_url=False, include_input=False):
                loc = [str(p) for p in err["loc"] if not str(p).startswith("function-")]
                sub = "".join(f"/{escape_pointer_token(p)}" for p in loc)
                what = ".".join(loc)
                message = err["msg"].removeprefix("Value error, ")
                problem(pointer + sub, f"{what}: {message}" if what else message, label)
            continue
        if target.name in seen:
            problem(pointer + "/name", f"name also used by target #{seen[target.name] + 1}", label)
            continue
        seen[target.name] = index
        targets.append(target)
    if problems:
        raise TargetConfigError(problems)
    return targets


def _substitute_tree(
    node: Any,
    pointer: str,
    environ: Mapping[str, str],
    report: Callable[[str, str], None],
) -> Any:
    """A copy of ``node`` with every string value substituted; problems go to ``report``."""
    if isinstance(node, dict):
        return {
            k: _substitute_tree(v, f"{pointer}/{escape_pointer_token(k)}", environ, report)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_substitute_tree(v, f"{pointer}/{i}", environ, report) for i, v in enumerate(node)]
    if isinstance(node, str):
        try:
            return _substitute(node, environ)
        except _UnsetVariable as exc:
            report(pointer, f"environment variable {exc.name} is not set")
        except _MalformedReference:
            report(pointer, "malformed ${...} reference (use ${NAME} or ${NAME:-default})")
        return node
    return node
