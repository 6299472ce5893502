"""Check any FHIR R4 resource, Bundle or NDJSON stream: structure, R4 schema and vital signs.

The integrator-facing validator behind ``fhirbridge validate`` and ``POST /fhir/$validate``.
Each resource is checked by
  * :class:`fhirbridge.fhir.validate.OutputValidator` (R4B models + official R4 JSON Schema), and
  * :func:`fhirbridge.fhir.profiles.check_vital_signs` (the R4 vital-signs profiles),
and the findings are merged and sorted by location, array indices numerically. A problem both
report (same location, issue code and severity, e.g. a vital sign without ``status``) is kept
once, in the structural validator's wording; identical issues are kept once.

Bundles: the Bundle itself is validated with its entries' resources taken out, then every
``entry[i].resource`` is checked on its own (nested Bundles recursively) and its locations are
rebased onto the Bundle: ``Bundle.entry[3].resource.status`` (the same FHIRPath style the
structural validator uses for nested resources). Checking entries one by one is not only
cheaper to explain: validating the Bundle as a whole stops at the first problem of an entry.
A Bundle's ``urn:uuid`` fullUrls are resolved so that ``subject`` references can be typed.

Everything here is pure: it works on parsed data, on bytes, or on an iterable of byte lines
(an open file is one); it never opens files and never prints. Messages never contain instance
values; a malformed document is reported by line and column only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from fhirbridge.errors import Issue
from fhirbridge.fhir.profiles import Resolver, check_vital_signs
from fhirbridge.fhir.validate import OutputValidator

__all__ = [
    "Checked",
    "check_document",
    "check_json_text",
    "check_ndjson",
    "check_resource",
    "check_stream",
    "count_resources",
    "format_issue",
    "looks_like_ndjson",
]

#: Severities that make a check fail (FHIR IssueSeverity).
FAILING: Final = frozenset({"fatal", "error"})

_STEP = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")
_ROOT = re.compile(r"[A-Za-z][A-Za-z0-9]*")


# --------------------------------------------------------------------------------------------
# Parsed data
# --------------------------------------------------------------------------------------------


def check_resource(
    resource: Any,
    *,
    validator: OutputValidator | None = None,
    nominated: Sequence[str] = (),
    resolve: Resolver | None = None,
) -> list[Issue]:
    """The issues of one resource (``[]`` when valid); Bundle entries are not rebased here.

    ``nominated``: vital-signs profile URLs to apply even if the resource does not claim them.
    ``resolve``: ``reference -> resource type or None`` for references the text cannot type.
    """
    validator = validator or OutputValidator()
    structural = validator.validate(resource)
    # The same problem seen by both (a vital sign without status): keep the structural wording.
    seen = {(i.expression, i.code, i.severity) for i in structural}
    profile = check_vital_signs(resource, nominated=nominated, resolve=resolve)
    return _merge(
        [*structural, *(i for i in profile if (i.expression, i.code, i.severity) not in seen)]
    )


def check_document(
    data: Any, *, validator: OutputValidator | None = None, nominated: Sequence[str] = ()
) -> list[Issue]:
    """The issues of a resource or a Bundle and all its entries, sorted by location."""
    validator = validator or OutputValidator()
    if _is_bundle(data):
        return _merge(_check_bundle(data, "Bundle", validator, nominated))
    return check_resource(data, validator=validator, nominated=nominated)


def count_resources(data: Any) -> int:
    """How many resources :func:`check_document` checks in ``data`` (a Bundle and its entries)."""
    if not _is_bundle(data):
        return 1
    return 1 + sum(count_resources(r) for r in _entry_resources(data))


def _is_bundle(data: Any) -> bool:
    return (
        isinstance(data, dict)
        and data.get("resourceType") == "Bundle"
        and isinstance(data.get("entry"), list)
    )


def _entry_resources(bundle: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for entry in bundle["entry"]:
        if isinstance(entry, dict) and isinstance(entry.get("resource"), dict):
            yield entry["resource"]


def _check_bundle(
    bundle: dict[str, Any], prefix: str, validator: OutputValidator, nominated: Sequence[str]
) -> list[Issue]:
    # The shell keeps everything but the entries' resources, which are checked one by one; a
    # non-object `resource` stays in the shell so the structural validator reports it.
    shell = dict(bundle)
    shell["entry"] = [
        {k: v for k, v in entry.items() if k != "resource"}
        if isinstance(entry, dict) and isinstance(entry.get("resource"), dict)
        else entry
        for entry in bundle["entry"]
    ]
    issues = [_rebase(i, prefix) for i in check_resource(shell, validator=validator)]
    if nominated:  # a nominated profile applies to the resource validated: the Bundle
        issues += [_rebase(i, prefix) for i in check_vital_signs(bundle, nominated=nominated)]
    full_urls = {
        entry["fullUrl"]: entry["resource"].get("resourceType")
        for entry in bundle["entry"]
        if isinstance(entry, dict)
        and isinstance(entry.get("fullUrl"), str)
        and isinstance(entry.get("resource"), dict)
    }

    def resolve(reference: str) -> str | None:
        kind = full_urls.get(reference)
        return kind if isinstance(kind, str) else None

    for index, entry in enumerate(bundle["entry"]):
        if not (isinstance(entry, dict) and isinstance(entry.get("resource"), dict)):
            continue
        resource = entry["resource"]
        where = f"{prefix}.entry[{index}].resource"
        if _is_bundle(resource):
            issues += _check_bundle(resource, where, validator, ())
        else:
            found = check_resource(resource, validator=validator, resolve=resolve)
            issues += [_rebase(i, where) for i in found]
    return issues


def _rebase(issue: Issue, prefix: str) -> Issue:
    """``Observation.status`` (or ``Resource.resourceType``) -> ``<prefix>.status``."""
    if not issue.expression:
        return Issue(issue.diagnostics, (prefix,), issue.code, issue.severity)
    rebased = []
    for expression in issue.expression:
        root = _ROOT.match(expression)
        rebased.append(prefix + (expression[root.end() :] if root else ""))
    return Issue(issue.diagnostics, tuple(rebased), issue.code, issue.severity)


def _merge(issues: Iterable[Issue]) -> list[Issue]:
    """Identical issues once, sorted by location (distinct problems at one location stay)."""
    return sorted(dict.fromkeys(issues), key=_sort_key)


def _sort_key(issue: Issue) -> tuple[Any, ...]:
    where = issue.expression[0] if issue.expression else ""
    root = _ROOT.match(where)
    steps = tuple(
        (0, int(index), "") if index else (1, 0, name)
        for name, index in _STEP.findall(where[root.end() :] if root else where)
    )
    return (steps, issue.code, issue.diagnostics)


def _steps(expression: str) -> tuple[str | int, ...]:
    """``Bundle.entry[3].resource.code`` -> ``("entry", 3, "resource", "code")``."""
    root = _ROOT.match(expression)
    rest = expression[root.end() :] if root else expression
    return tuple(int(index) if index else name for name, index in _STEP.findall(rest))


# --------------------------------------------------------------------------------------------
# Text: JSON documents and NDJSON lines
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Checked:
    """What one JSON document (a whole file, or one NDJSON line) gave."""

    line: int  # the line the document starts on
    resources: int  # resources checked (0 when malformed)
    findings: list[tuple[int, Issue]] = field(default_factory=list)  # (line, issue)
    malformed: bool = False

    @property
    def failed(self) -> bool:
        return any(issue.severity in FAILING for _, issue in self.findings)


def check_json_text(
    raw: bytes,
    *,
    first_line: int = 1,
    validator: OutputValidator | None = None,
    nominated: Sequence[str] = (),
) -> Checked:
    """Parse and check one JSON document; every finding gets the line of its location."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # orjson's message quotes the document: keep only the position
        line = first_line + exc.lineno - 1
        where = f"line {line}, column {exc.colno}" if first_line == 1 else f"column {exc.colno}"
        issue = Issue(f"malformed JSON at {where}", code="structure", severity="fatal")
        return Checked(first_line, 0, [(line, issue)], malformed=True)
    issues = check_document(data, validator=validator, nominated=nominated)
    if not issues:
        return Checked(first_line, count_resources(data))
    if b"\n" in raw.rstrip(b"\r\n"):
        lines = locate_lines(raw, [i.expression[0] for i in issues if i.expression])
        located = [
            (first_line - 1 + lines.get(i.expression[0] if i.expression else "", 1), i)
            for i in issues
        ]
    else:  # one line: nothing to locate
        located = [(first_line, i) for i in issues]
    return Checked(first_line, count_resources(data), located)


def check_ndjson(
    lines: Iterable[bytes],
    *,
    first_line: int = 1,
    validator: OutputValidator | None = None,
) -> Iterator[Checked]:
    """Check an NDJSON stream one line at a time (memory bounded by the longest line).

    Blank lines are skipped; a malformed line is reported and the next lines still checked.
    """
    validator = validator or OutputValidator()
    for number, line in enumerate(lines, start=first_line):
        if line.strip():
            yield check_json_text(line, first_line=number, validator=validator)


def looks_like_ndjson(name: str, first_line: bytes) -> bool:
    """NDJSON when the name says so, or when the first non-blank line is a whole JSON object.

    A pretty-printed JSON document's first line (``{``) is never a whole object; a one-line
    JSON document checks the same either way.
    """
    if name.lower().endswith((".ndjson", ".jsonl")):
        return True
    try:
        return isinstance(orjson.loads(first_line), dict)
    except orjson.JSONDecodeError:
        return False


def check_stream(
    name: str, lines: Iterable[bytes], *, validator: OutputValidator | None = None
) -> Iterator[Checked]:
    """Check a file given as byte lines: NDJSON streamed line by line, JSON read whole."""
    validator = validator or OutputValidator()
    iterator = iter(lines)
    head: list[bytes] = []
    for line in iterator:
        head.append(line)
        if line.strip():
            break
    if not head or not head[-1].strip():
        issue = Issue("empty input: no JSON document", code="structure", severity="fatal")
        yield Checked(1, 0, [(1, issue)], malformed=True)
        return
    if looks_like_ndjson(name, head[-1]):
        yield from check_ndjson(head[-1:], first_line=len(head), validator=validator)
        yield from check_ndjson(iterator, first_line=len(head) + 1, validator=validator)
        return
    yield check_json_text(b"".join([*head, *iterator]), validator=validator)


def format_issue(name: str, line: int, issue: Issue) -> str:
    """``FILE:LINE: severity location: message`` (location ``-`` when there is none)."""
    where = ", ".join(issue.expression) or "-"
    return f"{name}:{line}: {issue.severity} {where}: {issue.diagnostics}"


# --------------------------------------------------------------------------------------------
# Line numbers of FHIRPath locations
# --------------------------------------------------------------------------------------------

# Strings, punctuation, newlines and bare literals; other whitespace is skipped by finditer.
# Raw newlines cannot occur inside a valid JSON string, so counting `\n` tokens is exact.
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[{}\[\],:]|\n|[^\s{}\[\],:"]+')


def locate_lines(raw: bytes, expressions: Iterable[str]) -> dict[str, int]:
    """The line of each location in the (valid) JSON text ``raw``, 1-based.

    A location that does not exist in the text (a missing element) gets the line of its
    deepest existing ancestor, so the report points at the object that lacks it.
    """
    wanted = {e: _steps(e) for e in expressions}
    prefixes = {steps[:n] for steps in wanted.values() for n in range(len(steps) + 1)}
    found: dict[tuple[str | int, ...], int] = {}
    line = 1
    path: list[str | int] = []
    # per open container: [is_object, element count]; an object's key is pushed on `path`
    containers: list[list[Any]] = []
    expect_key = False

    def value_start() -> None:
        if containers and not containers[-1][0]:
            path.append(containers[-1][1])
            containers[-1][1] += 1
        key = tuple(path)
        if key in prefixes and key not in found:
            found[key] = line

    def value_end() -> None:
        if containers:
            path.pop()

    for match in _TOKEN.finditer(raw):
        token = match.group()
        if token == b"\n":
            line += 1
        elif expect_key:
            if token == b"}":
                containers.pop()
                expect_key = False
                value_end()
            elif token[:1] == b'"':
                key = orjson.loads(token)
                path.append(key if isinstance(key, str) else "")
                expect_key = False
        elif token == b":":
            continue
        elif token == b",":
            expect_key = bool(containers and containers[-1][0])
        elif token in (b"{", b"["):
            value_start()
            containers.append([token == b"{", 0])
            expect_key = token == b"{"
        elif token in (b"}", b"]"):
            containers.pop()
            value_end()
        else:  # a scalar
            value_start()
            value_end()
    result: dict[str, int] = {}
    for expression, steps in wanted.items():
        for n in range(len(steps), -1, -1):
            if steps[:n] in found:
                result[expression] = found[steps[:n]]
                break
    return result
