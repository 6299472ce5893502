"""Input validation: the pack's source JSON Schema (Draft 2020-12) plus its integrity rules.

Every problem is reported, each with the JSON path of the offending element; messages are built
from the schema (what was expected), never from the instance, so no patient value is echoed.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, datetime
from functools import lru_cache
from typing import Any

import jsonschema
import jsonschema_rs
from jsonschema import FormatChecker, ValidationError

from fhirbridge.errors import Issue
from fhirbridge.mapping.expr import parse_path, walk_values, walk_with_paths
from fhirbridge.mapping.pack import Integrity, check_source_schema

_FORMAT_NAMES = {
    "fhir-instant": "a date-time with seconds and a timezone offset "
    "(e.g. 2026-03-02T09:00:00-05:00)",
    "fhir-date": "a date: YYYY, YYYY-MM or YYYY-MM-DD",
    "fhir-datetime": "a date (YYYY, YYYY-MM, YYYY-MM-DD) or a date-time with seconds and a "
    "timezone offset",
}

_FORMATS = FormatChecker(formats=())


def _real_date(text: str) -> bool:
    parts = text.split("-")
    try:
        if len(parts) == 3:
            date(int(parts[0]), int(parts[1]), int(parts[2]))
        elif len(parts) == 2:
            return 1 <= int(parts[1]) <= 12
        return True
    except ValueError:
        return False


@_FORMATS.checks("fhir-date")
def _check_date(value: object) -> bool:
    return not isinstance(value, str) or _real_date(value)


@_FORMATS.checks("fhir-instant")
def _check_instant(value: object) -> bool:
    if not isinstance(value, str):
        return True
    try:
        return datetime.fromisoformat(value).tzinfo is not None
    except ValueError:
        return False


@_FORMATS.checks("fhir-datetime")
def _check_datetime(value: object) -> bool:
    if not isinstance(value, str):
        return True
    return _check_instant(value) if "T" in value else _real_date(value)


def json_path(parts: Iterable[str | int]) -> str:
    """deque(['sessions', 0, 'start']) → 'sessions[0].start' (FHIRPath-like, for expression)."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "$"


class SubmissionValidator:
    """The compiled source schema and the pack's integrity rules; built once at start-up."""

    def __init__(self, schema: dict[str, Any], integrity: Integrity | None = None) -> None:
        check_source_schema(schema)  # done already when load_pack read this schema
        self._validator = jsonschema.Draft202012Validator(schema, format_checker=_FORMATS)
        # The same schema and format checks, compiled by jsonschema-rs: it answers "valid?" in
        # a few µs where the Python validator takes ~1.5 ms per medicine session, and every
        # accepted submission only needs that answer. The Python validator still explains
        # every rejected one, so messages and paths are unchanged; a test holds the two to the
        # same verdicts.
        self._fast = jsonschema_rs.validator_for(
            schema,
            formats={
                "fhir-date": _check_date,
                "fhir-instant": _check_instant,
                "fhir-datetime": _check_datetime,
            },
            validate_formats=True,
        )
        self._integrity = integrity or Integrity()

    def validate(self, document: Any) -> list[Issue]:
        """All problems of the document, schema ones first, each sorted by path."""
        issues: list[Issue] = []
        errors = (
            []
            if self._fast.is_valid(document)
            else sorted(
                self._validator.iter_errors(document), key=lambda e: json_path(e.absolute_path)
            )
        )
        for error in errors:
            issue = _issue(error)
            if issue not in issues:  # a pattern and its format can say the same thing twice
                issues.append(issue)
        if isinstance(document, dict):
            issues += check_integrity(document, self._integrity)
        return issues


def _issue(error: ValidationError) -> Issue:
    path = list(error.absolute_path)
    kind = error.validator
    value: Any = error.validator_value
    schema = error.schema if isinstance(error.schema, dict) else {}
    code = "invalid"
    if kind == "required":
        missing = [
            r for r in value if not (isinstance(error.instance, dict) and r in error.instance)
        ]
        message = "required property missing: " + ", ".join(missing)
        code = "required"
        path = [*path, missing[0]] if len(missing) == 1 else path
    elif kind == "type":
        expected = value if isinstance(value, str) else " or ".join(value)
        message = f"must be of type {expected}"
        code = "structure"
    elif kind == "enum":
        message = "must be one of: " + ", ".join(str(v) for v in value)
        code = "code-invalid"
    elif kind == "const":
        message = f"must be {value!r}"
    elif kind == "additionalProperties":
        # Property names come from the client and may themselves be patient data: name the
        # allowed ones (from the schema) instead of the unknown ones.
        allowed = list(schema.get("properties", {}))
        message = "unknown property" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
        code = "structure"
    elif kind in ("pattern", "format"):
        fmt = schema.get("format")
        described = _FORMAT_NAMES.get(fmt) if isinstance(fmt, str) else None
        message = (
            f"must be {described}"
            if described
            else (
                f"invalid format: {schema['description']}"
                if "description" in schema
                else "does not match the required format"
            )
        )
        code = "value"
    elif kind in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        op = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}[
            kind
        ]
        message = f"must be {op} {value}"
        code = "value"
    elif kind in ("minLength", "maxLength"):
        message = f"length must be {'at least' if kind == 'minLength' else 'at most'} {value}"
        code = "value"
    elif kind in ("minItems", "maxItems"):
        message = f"must have {'at least' if kind == 'minItems' else 'at most'} {value} items"
        code = "value" if kind == "minItems" else "too-costly"
    elif kind == "uniqueItems":
        message = "items must be unique"
        code = "value"
    elif kind == "dependentRequired":
        missing_by = [
            f"{dep} is required when {prop} is present"
            for prop, deps in value.items()
            for dep in deps
            if isinstance(error.instance, dict)
            and prop in error.instance
            and dep not in error.instance
        ]
        message = "; ".join(missing_by) or "dependent property missing"
        code = "required"
    elif kind == "anyOf" and all(isinstance(b, dict) and set(b) == {"required"} for b in value):
        forms = ["+".join(b["required"]) for b in value]
        message = "needs at least one of: " + ", ".join(forms)
        code = "required"
    elif kind in ("anyOf", "oneOf"):
        message = "does not match any allowed form"
    else:
        message = f"fails the {kind} rule of the source schema"
    return Issue(message, (json_path(path),), code=code)


# ---------------------------------------------------------------- integrity


_ID_TYPES = (str, int)  # what an id may be; a tuple, as `str | int` is made anew at each test


def check_integrity(document: dict[str, Any], integrity: Integrity) -> list[Issue]:
    """Duplicate ids, dangling references and reversed periods, with the path of each.

    Each rule is first checked on the bare values; only a rule that finds a problem walks the
    document again for the paths to report (most documents have none).
    """
    issues: list[Issue] = []
    for path in integrity.unique:
        found = [value for value in _plain(document, path) if isinstance(value, _ID_TYPES)]
        if len(set(found)) == len(found):
            continue
        first_seen: dict[Any, str] = {}
        for value, where in _values(document, path):
            if not isinstance(value, str | int):
                continue
            if value in first_seen:
                issues.append(
                    Issue(
                        f"duplicate id (first used at {first_seen[value]})",
                        (where,),
                        code="duplicate",
                    )
                )
            else:
                first_seen[value] = where
    # The ids of a collection, by its path: several references point at the same one.
    all_ids: dict[str, set[Any]] = {}

    def ids_in(to: str) -> set[Any]:
        ids = all_ids.get(to)
        if ids is None:
            ids = all_ids[to] = _target_ids(document, to, None)
        return ids

    for ref in integrity.references:
        condition = ref.get("where")
        targets = _target_ids(document, ref["to"], condition) if condition else ids_in(ref["to"])
        # A filtered rule only speaks of ids that exist: a missing id is the plain rule's problem.
        existing = ids_in(ref["to"]) if condition else None
        if all(
            not isinstance(value, _ID_TYPES)
            or (existing is not None and value not in existing)
            or value in targets
            for value in _plain(document, ref["from"])
        ):
            continue
        message = ref.get("message") or f"refers to an id that is not in {ref['to']}"
        for value, where in _values(document, ref["from"]):
            if not isinstance(value, str | int):
                continue  # a wrong type is the schema's problem (and may be unhashable)
            if existing is not None and value not in existing:
                continue
            if value not in targets:
                issues.append(Issue(message, (where,), code="not-found"))
    for order in integrity.order:
        if not any(_reversed(item, order) for item in _plain(document, order["each"])):
            continue
        for item, where in _values(document, order["each"]):
            if _reversed(item, order):
                issues.append(
                    Issue(
                        f"{order['then']} is before {order['first']}",
                        (f"{where}.{order['then']}",),
                        code="value",
                    )
                )
    return issues


@lru_cache(maxsize=256)
def _steps(path: str) -> tuple[str | int | object, ...] | None:
    """The parsed steps of an integrity path (a handful per pack, parsed once each)."""
    parsed = parse_path("$." + path)
    return None if parsed is None else tuple(parsed[1])


def _values(document: dict[str, Any], path: str) -> list[tuple[Any, str]]:
    steps = _steps(path)
    if steps is None:
        return []
    return walk_with_paths(document, steps, "")


def _plain(document: dict[str, Any], path: str) -> list[Any]:
    """The values of :func:`_values`, in the same order, without making their paths."""
    steps = _steps(path)
    if steps is None:
        return []
    return walk_values(document, steps)


def _reversed(item: Any, order: dict[str, str]) -> bool:
    """An item whose `then` instant is before its `first` one."""
    if not isinstance(item, dict):
        return False
    first, then = _instant(item.get(order["first"])), _instant(item.get(order["then"]))
    return first is not None and then is not None and then < first


def _target_ids(document: dict[str, Any], to: str, where: dict[str, Any] | None) -> set[Any]:
    collection, _, field_name = to.rpartition(".")
    ids = set()
    for item in _plain(document, collection):
        if not isinstance(item, dict):
            continue
        if where and any(item.get(k) != v for k, v in where.items()):
            continue
        value = item.get(field_name)
        if isinstance(value, _ID_TYPES):
            ids.add(value)
    return ids


def _instant(value: Any) -> datetime | None:
    if not isinstance(value, str) or "T" not in value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None
