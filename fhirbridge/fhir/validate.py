"""Validation of every FHIR R4 resource fhirbridge emits, against two independent validators.

This module owns the output gate: a resource leaves the service only when both
  1. the fhir.resources **R4B** pydantic model for its type accepts it (R4B equals R4 for the
     resources we emit; the top-level fhir.resources models are R5 and are never used), and
  2. the official HL7 FHIR R4 JSON Schema (``fhirbridge/schemas/fhir.schema.json``, see
     ``PROVENANCE.md`` there) accepts it, checked with jsonschema-rs (Draft 6).
The two are complementary: the schema checks required code bindings (``Observation.status``)
and JSON types (a decimal must be a JSON number), which the models let through; the models
check choice-type exclusivity, calendar validity, time zones, integer ranges and required
primitive elements, which the schema does not express.

Findings are returned as :class:`fhirbridge.errors.Issue` with a FHIRPath-style location
(``Observation.component[0].valueQuantity.code``). Diagnostics are built only from the kind of
problem and from schema/model facts (expected type, allowed codes, pattern); they never
contain the offending instance value, so they are safe to log and to return to clients.

Heavy artefacts (parsed schema, compiled validators, model classes) are built lazily once per
process and cached at module level, so importing this module stays cheap.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib import resources
from typing import Any, Final

import jsonschema_rs
import orjson
from pydantic import ValidationError as PydanticValidationError

from fhirbridge.errors import Issue

__all__ = [
    "EMITTED_RESOURCE_TYPES",
    "SCHEMA_SHA256",
    "OutputValidator",
    "ValidationIssue",
]

#: The Issue type this module returns (kept as a name for callers that expect it).
ValidationIssue = Issue

#: sha256 of the shipped, unmodified schema file (also recorded in schemas/PROVENANCE.md).
SCHEMA_SHA256: Final = "15b9548af6412c44faaa411456e0652542de286fd1c58ef882b09bdc8947909d"

#: Resource types fhirbridge produces (mappings/rules/*.yaml, plus the transaction Bundle);
#: :meth:`OutputValidator.warm` prepares their models. Other types still validate, lazily.
EMITTED_RESOURCE_TYPES: Final = (
    "AdverseEvent",
    "Bundle",
    "Encounter",
    "EpisodeOfCare",
    "Medication",
    "MedicationAdministration",
    "Observation",
    "Patient",
    "Practitioner",
    "Procedure",
    "Provenance",
)

Path = tuple[str | int, ...]

# Enum lists longer than this are cut in diagnostics (some bindings have ~100 codes).
_MAX_LISTED_CODES: Final = 12
# Per-type detail validators cost ~0.1 s and ~18 MB each, and only run for invalid output
# (a mapping bug), so only the most recently needed few are kept.
_DETAIL_CACHE_SIZE: Final = 8
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


# --------------------------------------------------------------------------------------------
# Lazily built artefacts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Schema:
    """The patched R4 schema and what is derived from it, built once per process."""

    definitions: dict[str, Any]
    resource_types: frozenset[str]
    # index of each resource type in the ResourceList oneOf (to pick the right branch's errors)
    resource_list_index: Mapping[str, int]
    # primitive definition names by their pattern with ^/$ anchors removed
    primitive_by_pattern: Mapping[str, tuple[str, ...]]
    # fast path: the whole schema; its root oneOf dispatches on resourceType
    validator: jsonschema_rs.Validator


_schema_lock = threading.Lock()
_schema_state: _Schema | None = None


def _load_patched_schema() -> tuple[dict[str, Any], int]:
    """Parse the shipped schema and apply the one load-time patch (file stays untouched).

    Patch: the schema's complex-type definitions (those with ``properties``) have no
    ``"type": "object"``, so e.g. an array passes where an object is required (``properties``
    only constrains objects). Every such definition gets ``"type": "object"``.
    Returns the schema and the number of patched definitions.
    """
    raw = (resources.files("fhirbridge") / "schemas" / "fhir.schema.json").read_bytes()
    schema: dict[str, Any] = orjson.loads(raw)
    patched = 0
    for definition in schema["definitions"].values():
        if "properties" in definition and "type" not in definition:
            definition["type"] = "object"
            patched += 1
    return schema, patched


def _build_schema() -> _Schema:
    schema, _ = _load_patched_schema()
    definitions: dict[str, Any] = schema["definitions"]
    refs = [entry["$ref"] for entry in definitions["ResourceList"]["oneOf"]]
    index = {ref.rsplit("/", 1)[1]: i for i, ref in enumerate(refs)}
    by_pattern: dict[str, list[str]] = {}
    for name, definition in definitions.items():
        if "pattern" in definition:
            by_pattern.setdefault(_strip_anchors(definition["pattern"]), []).append(name)
    # mask: jsonschema-rs formats messages that quote the instance; we never use them, and
    # masking keeps patient values out of them should an error object ever be logged.
    validator = jsonschema_rs.Draft6Validator(schema, offline=True, mask="***")
    return _Schema(
        definitions=definitions,
        resource_types=frozenset(schema["discriminator"]["mapping"]),
        resource_list_index=index,
        primitive_by_pattern={k: tuple(sorted(v)) for k, v in by_pattern.items()},
        validator=validator,
    )


def _schema() -> _Schema:
    global _schema_state
    state = _schema_state
    if state is None:
        with _schema_lock:  # one build even when several threads validate the first resource
            if _schema_state is None:
                _schema_state = _build_schema()
            state = _schema_state
    return state


@lru_cache(maxsize=_DETAIL_CACHE_SIZE)
def _detail_validator(resource_type: str) -> jsonschema_rs.Validator:
    """A validator rooted at one resource definition, used only to explain an invalid resource.

    The whole-schema validator is as fast for ``is_valid`` but reports a failure as one root
    ``oneOf`` whose per-branch errors cost milliseconds (seconds with ``contained``, where
    every branch nests another 146-way ``oneOf``); rooting at the definition gives precise
    errors in ~50 µs.
    """
    wrapper = {"$ref": f"#/definitions/{resource_type}", "definitions": _schema().definitions}
    return jsonschema_rs.Draft6Validator(wrapper, offline=True, mask="***")


_MISSING_MODEL: Final = object()


@cache
def _r4b_model(resource_type: str) -> Any:
    """The R4B model class for a resource type, or ``_MISSING_MODEL`` if R4B dropped it."""
    # Imported here: fhir.resources.R4B costs ~0.1 s to import, and import must stay cheap.
    from fhir.resources.R4B import get_fhir_model_class

    try:
        return get_fhir_model_class(resource_type)
    except ValueError:  # R4 types removed in R4B (MedicinalProduct*, Substance*, ...)
        return _MISSING_MODEL


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


class OutputValidator:
    """Validates output resources against the R4B models and the official R4 JSON Schema."""

    __slots__ = ()

    def __init__(self) -> None:
        """Cheap: the heavy artefacts are shared, module-level and built on first use."""

    def warm(self) -> None:
        """Build the schema validator and load the models of :data:`EMITTED_RESOURCE_TYPES`.

        Called at service start-up so the first request does not pay ~0.3 s. The per-type
        detail validators stay lazy: they are only needed to explain an invalid resource.
        """
        _schema()
        for resource_type in EMITTED_RESOURCE_TYPES:
            _r4b_model(resource_type)

    def validate(self, resource: dict[str, Any]) -> list[Issue]:
        """Return the problems of ``resource`` (``[]`` when valid), sorted by location.

        Never raises for bad input: a non-object, a missing or unknown ``resourceType`` are
        reported as issues. The resource is neither copied nor modified.
        """
        if not isinstance(resource, dict):
            return [Issue("a resource must be a JSON object", code="structure")]
        resource_type = resource.get("resourceType")
        if resource_type is None:
            return [Issue("resourceType is missing", ("Resource.resourceType",), "required")]
        schema = _schema()
        if not isinstance(resource_type, str) or resource_type not in schema.resource_types:
            return [
                Issue(
                    "resourceType is not a FHIR R4 resource type",
                    ("Resource.resourceType",),
                    "code-invalid",
                )
            ]
        model_findings = _r4b_findings(resource, resource_type)
        schema_findings: list[_Finding] = []
        if not schema.validator.is_valid(resource):
            schema_findings = _schema_findings(resource, resource_type, schema)
        if not model_findings and not schema_findings:
            return []
        return _merge(resource_type, schema_findings, model_findings)


# --------------------------------------------------------------------------------------------
# Findings and their merge
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Finding:
    """One problem before it becomes an Issue: location relative to the resource root."""

    path: Path
    code: str
    message: str


def _merge(
    resource_type: str, schema_findings: list[_Finding], model_findings: list[_Finding]
) -> list[Issue]:
    """Deduplicate and sort.

    Two findings at the same location with the same issue code are the same problem seen by
    both validators (a missing element, an unknown element, a malformed primitive); the
    schema's wording is kept because it names the FHIR datatype. Findings that differ in
    location or code are all kept.
    """
    chosen: dict[tuple[Path, str], _Finding] = {}
    for finding in schema_findings:
        chosen.setdefault((finding.path, finding.code), finding)
    for finding in model_findings:
        chosen.setdefault((finding.path, finding.code), finding)
    ordered = sorted(chosen.values(), key=lambda f: (_sort_key(f.path), f.code, f.message))
    return [Issue(f.message, (_fhirpath(resource_type, f.path),), f.code) for f in ordered]


def _sort_key(path: Path) -> tuple[tuple[int, int, str], ...]:
    # ints and strs never compare directly; indices sort numerically ([2] before [10])
    return tuple((0, p, "") if isinstance(p, int) else (1, 0, p) for p in path)


def _fhirpath(resource_type: str, path: Path) -> str:
    """``("component", 0, "code")`` -> ``Observation.component[0].code``."""
    parts = [resource_type]
    for step in path:
        parts.append(f"[{step}]" if isinstance(step, int) else f".{step}")
    return "".join(parts)


# Shared wording, so that the same problem reads the same whichever validator found it.
def _msg_required() -> str:
    return "required element is missing"


def _msg_unknown_element() -> str:
    return "element is not defined for this FHIR R4 type"


def _msg_expected(what: str) -> str:
    return f"wrong type: expected {what}"


def _msg_primitive(name: str) -> str:
    return f"not a valid FHIR {name}"


def _lower_first(name: str) -> str:
    return name[:1].lower() + name[1:]


def _strip_anchors(pattern: str) -> str:
    return pattern.removeprefix("^").removesuffix("$")


def _join_codes(values: Sequence[Any]) -> str:
    shown = ", ".join(str(v) for v in values[:_MAX_LISTED_CODES])
    if len(values) > _MAX_LISTED_CODES:
        shown += f", … ({len(values) - _MAX_LISTED_CODES} more)"
    return shown


def _pattern_message(pattern: str, schema: _Schema) -> str:
    names = schema.primitive_by_pattern.get(_strip_anchors(pattern))
    if names:
        return _msg_primitive(" or ".join(names))
    return "value does not match the FHIR R4 format of this element"


# --------------------------------------------------------------------------------------------
# R4B models
# --------------------------------------------------------------------------------------------


def _r4b_findings(resource: dict[str, Any], resource_type: str) -> list[_Finding]:
    model = _r4b_model(resource_type)
    if model is _MISSING_MODEL:
        return [
            _Finding(
                (),
                "not-supported",
                "resource type has no R4B model, so it cannot be fully validated",
            )
        ]
    try:
        model.model_validate(resource)
    except PydanticValidationError as exc:
        # include_input=False: the error dicts then never hold the instance value
        errors = exc.errors(include_url=False, include_input=False)
        return [
            _from_pydantic(err["type"], tuple(err["loc"]), err.get("ctx") or {}) for err in errors
        ]
    except Exception as exc:
        # fhir.resources raises bare exceptions on some malformed input (KeyError for a
        # contained resource with an unknown resourceType); its text may quote the input.
        return [_Finding((), "exception", f"R4B model check failed ({type(exc).__name__})")]
    return []


_PYDANTIC_EXPECTED: Final[Mapping[str, str]] = {
    "string_type": "JSON string",
    "string_sub_type": "JSON string",
    "string_unicode": "JSON string",
    "bool_type": "JSON boolean",
    "bool_parsing": "JSON boolean",
    "int_type": "JSON number (integer)",
    "int_parsing": "JSON number (integer)",
    "float_type": "JSON number",
    "float_parsing": "JSON number",
    "decimal_type": "JSON number",
    "decimal_parsing": "JSON number",
    "list_type": "JSON array",
    "tuple_type": "JSON array",
    "dict_type": "JSON object",
    "model_type": "JSON object",
    "model_attributes_type": "JSON object",
    "dataclass_type": "JSON object",
    # fhir_core parses a string given for a complex element as JSON text
    "json_invalid": "JSON object",
    "json_type": "JSON object",
}

_BOUND_OPS: Final[Mapping[str, tuple[str, str]]] = {
    "greater_than": ("gt", ">"),
    "greater_than_equal": ("ge", ">="),
    "less_than": ("lt", "<"),
    "less_than_equal": ("le", "<="),
}

_SPEC_REGEX = re.compile(r"(\w+) value string does not match spec regex\.")
_CHOICE_LIST = re.compile(r"\[([^\]]*)\]")


def _from_pydantic(kind: str, loc: tuple[Any, ...], ctx: Mapping[str, Any]) -> _Finding:
    """Translate one pydantic error into a finding, from its type and context only."""
    path = _pydantic_path(loc, kind)
    if kind in ("missing", "model_field_validation.missing"):
        return _Finding(path, "required", _msg_required())
    if kind == "extra_forbidden":
        return _Finding(path, "structure", _msg_unknown_element())
    if kind == "model_validation_format":
        model_class = ctx.get("model_class")
        if isinstance(model_class, str) and _IDENTIFIER.fullmatch(model_class):
            return _Finding(path, "structure", _msg_expected(f"{model_class} (JSON object)"))
        return _Finding(path, "structure", "wrong kind of element or resource here")
    if kind == "fhir-validation-wrong-resource-type":
        return _Finding(path, "value", "resourceType does not match the expected resource type")
    if kind == "list_type" and "field" in ctx:  # fhir_core's custom "None in a complex list"
        return _Finding(path, "structure", "null is not allowed in an array of elements")
    if kind in _PYDANTIC_EXPECTED:
        class_name = ctx.get("class_name")
        expected = _PYDANTIC_EXPECTED[kind]
        if isinstance(class_name, str) and _IDENTIFIER.fullmatch(class_name):
            expected = f"{class_name} ({expected})"
        return _Finding(path, "structure", _msg_expected(expected))
    if kind == "int_from_float":
        return _Finding(path, "value", "must be a whole number")
    if kind == "string_pattern_mismatch":
        return _Finding(path, "value", _pattern_message(str(ctx.get("pattern", "")), _schema()))
    if kind == "string_too_short":
        return _Finding(path, "value", "must not be empty")
    if kind == "string_too_long":
        return _Finding(path, "value", f"longer than {ctx.get('max_length')} characters")
    if kind in _BOUND_OPS:
        key, op = _BOUND_OPS[kind]
        bound = ctx.get(key)
        if isinstance(bound, int | float):
            return _Finding(path, "value", f"must be {op} {bound}")
    if kind == "value_error":
        return _from_value_error(path, ctx.get("error"))
    if kind.startswith(("date", "time")):
        return _Finding(path, "value", "not a valid calendar date or time")
    if kind.startswith("url"):
        return _Finding(path, "value", "not a valid URL")
    if kind in ("enum", "literal_error"):
        return _Finding(path, "code-invalid", "code is not in the allowed value set")
    return _Finding(path, "value", f"invalid value ({kind})")


def _pydantic_path(loc: tuple[Any, ...], kind: str) -> Path:
    steps: list[str | int] = []
    for step in loc:
        if isinstance(step, int):
            steps.append(step)
        elif step == "resource_type":  # the only python field name fhir_core puts in a loc
            steps.append("resourceType")
        else:
            steps.append(str(step))
    # fhir_core appends a pseudo-field "root" to errors about the element itself
    if kind == "model_validation_format" and steps and steps[-1] == "root":
        steps.pop()
    return tuple(steps)


def _from_value_error(path: Path, error: object) -> _Finding:
    """fhir_core raises ValueError with fixed texts; recognise them, never echo unknown text."""
    text = str(error) if error is not None else ""
    if match := _SPEC_REGEX.fullmatch(text):
        return _Finding(path, "value", _msg_primitive(_lower_first(match.group(1))))
    if "must be timezone aware" in text:
        return _Finding(path, "value", "a date-time with a time must have a time zone")
    if text == "Instant value does not parse to datetime.":
        return _Finding(path, "value", _msg_primitive("instant"))
    if text.startswith(("Any of one field value is expected", "Expect any of field value")):
        names = _choice_names(text)
        if text.startswith("Any of one"):
            return _Finding(
                path, "structure", f"only one choice of a [x] element may be present ({names})"
            )
        return _Finding(path, "required", f"one choice of a [x] element is required ({names})")
    return _Finding(path, "value", "invalid value")


def _choice_names(text: str) -> str:
    # the list holds model field names; keep only identifiers in case the format ever changes
    match = _CHOICE_LIST.search(text)
    items = [i.strip().strip("'\"") for i in match.group(1).split(",")] if match else []
    return ", ".join(i for i in items if _IDENTIFIER.fullmatch(i))


# --------------------------------------------------------------------------------------------
# JSON Schema
# --------------------------------------------------------------------------------------------


def _schema_findings(
    resource: dict[str, Any], resource_type: str, schema: _Schema
) -> list[_Finding]:
    errors = _detail_validator(resource_type).iter_errors(resource)
    return list(_from_schema_errors(errors, resource, schema))


def _from_schema_errors(
    errors: Iterable[jsonschema_rs.ValidationError], resource: dict[str, Any], schema: _Schema
) -> Iterable[_Finding]:
    """Translate jsonschema-rs errors from their kind, paths and schema facts only.

    ``error.message`` and ``error.instance`` quote the instance and are never read.
    """
    for error in errors:
        path: Path = tuple(error.instance_path)
        kind = error.kind
        schema_path = error.schema_path
        if isinstance(kind, jsonschema_rs.ValidationErrorKind.Required):
            yield _Finding((*path, kind.property), "required", _msg_required())
        elif isinstance(kind, jsonschema_rs.ValidationErrorKind.AdditionalProperties):
            for name in kind.unexpected:
                yield _Finding((*path, name), "structure", _msg_unknown_element())
        elif isinstance(kind, jsonschema_rs.ValidationErrorKind.Type):
            yield _Finding(
                path, "structure", _msg_expected(_expected_type(kind.types, schema_path, schema))
            )
        elif isinstance(kind, jsonschema_rs.ValidationErrorKind.Enum):
            allowed = _join_codes(kind.options)
            yield _Finding(
                path, "code-invalid", f"code is not in the required value set ({allowed})"
            )
        elif isinstance(kind, jsonschema_rs.ValidationErrorKind.Pattern):
            definition = _definition_name(schema_path, "pattern")
            if definition is not None and definition in schema.definitions:
                yield _Finding(path, "value", _msg_primitive(definition))
            else:
                yield _Finding(path, "value", _pattern_message(kind.pattern, schema))
        elif isinstance(kind, jsonschema_rs.ValidationErrorKind.Constant):
            yield _Finding(path, "value", f"must be {kind.expected_value}")
        elif isinstance(kind, jsonschema_rs.ValidationErrorKind.OneOfNotValid):
            yield from _from_resource_list(path, kind.context, resource, schema)
        else:
            yield _Finding(path, "value", f"violates the FHIR R4 schema ({kind.name})")


def _definition_name(schema_path: Sequence[str | int], keyword: str) -> str | None:
    """``[..., "definitions", "dateTime", "pattern"]`` -> ``"dateTime"``."""
    if len(schema_path) >= 3 and schema_path[-1] == keyword and schema_path[-3] == "definitions":
        return str(schema_path[-2])
    return None


def _expected_type(types: Sequence[str], schema_path: Sequence[str | int], schema: _Schema) -> str:
    json_types = " or ".join(types)
    name = _definition_name(schema_path, "type")
    if name is not None and name in schema.definitions:
        if "properties" in schema.definitions[name]:
            return f"{name} (JSON {json_types})"
        return f"FHIR {name} (JSON {json_types})"
    # Some primitives are inlined as {"type", "pattern"}; their pattern names the FHIR type.
    node = _schema_node(schema, schema_path[:-1])
    pattern = node.get("pattern") if isinstance(node, dict) else None
    names = schema.primitive_by_pattern.get(_strip_anchors(pattern)) if pattern else None
    if names:
        return f"FHIR {' or '.join(names)} (JSON {json_types})"
    return f"JSON {json_types}"


def _schema_node(schema: _Schema, schema_path: Sequence[str | int]) -> Any:
    """The schema object at a (resolved) schema path such as ``definitions/X/properties/y``."""
    if not schema_path or schema_path[0] != "definitions":
        return None
    return _at(schema.definitions, tuple(schema_path[1:]))


def _from_resource_list(
    path: Path,
    branches: Sequence[Sequence[jsonschema_rs.ValidationError]],
    resource: dict[str, Any],
    schema: _Schema,
) -> Iterable[_Finding]:
    """A nested resource (``contained``, ``Bundle.entry.resource``) failed ResourceList's oneOf.

    Every branch failed; only the branch of the nested resource's own type explains why.
    """
    nested = _at(resource, path)
    if not isinstance(nested, dict):
        yield _Finding(path, "structure", _msg_expected("a FHIR resource (JSON object)"))
        return
    nested_type = nested.get("resourceType")
    index = schema.resource_list_index.get(nested_type) if isinstance(nested_type, str) else None
    if index is None or index >= len(branches):
        if nested_type is None:
            yield _Finding((*path, "resourceType"), "required", _msg_required())
        else:
            message = "resourceType is not a FHIR R4 resource type"
            yield _Finding((*path, "resourceType"), "code-invalid", message)
        return
    yield from _from_schema_errors(branches[index], resource, schema)


def _at(document: Any, path: Path) -> Any:
    """The value at an instance path, or None if the path does not exist."""
    node = document
    for step in path:
        if isinstance(step, int) and isinstance(node, list) and 0 <= step < len(node):
            node = node[step]
        elif isinstance(step, str) and isinstance(node, dict):
            node = node.get(step)
        else:
            return None
    return node
