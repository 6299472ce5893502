"""The delivery error tree: what went wrong sending to a hospital FHIR server, PHI-free.

    FhirbridgeError (fhirbridge.errors)
    └── EhrError                  ehr_error            502  root; also a malformed request
        ├── TransientError        ehr_unavailable      503  408, 429, 5xx, refused/reset before
        │                                                   sending: safe to send again later
        ├── OutcomeUnknownError   ehr_outcome_unknown  504  a write may have reached the server
        │                                                   but no answer came: resolve by search
        ├── RejectedError         ehr_rejected         502  other 4xx: sending again will not help
        │   └── ConflictError     ehr_conflict         502  409 / 412: version conflict
        ├── InvalidResponseError  ehr_invalid_response 502  2xx, but not the FHIR asked for
        └── SearchLimitError      ehr_search_limit     502  a search has more pages than allowed

Every error carries `status` (None when no HTTP answer came) and `summary`, an OutcomeSummary of
the server's OperationOutcome that keeps only severity, issue code, details.coding system|code and
element paths: diagnostics and details.text are dropped because servers echo patient values there.
Messages name the method, the path without its query string and the status, never a body or a
reason phrase. `__cause__` is the requests exception, whose text may hold the full URL: log `code`
and `str(err)`, never the cause chain.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from fhirbridge.errors import FhirbridgeError

MAX_ISSUES = 10
MAX_CODINGS = 3
MAX_PATHS = 5

SEVERITIES = frozenset({"fatal", "error", "warning", "information"})
# http://hl7.org/fhir/R4/valueset-issue-type.html
ISSUE_TYPES = frozenset(
    {
        "invalid", "structure", "required", "value", "invariant", "security", "login", "unknown",
        "expired", "forbidden", "suppressed", "processing", "not-supported", "duplicate",
        "multiple-matches", "not-found", "deleted", "too-long", "code-invalid", "extension",
        "too-costly", "business-rule", "conflict", "transient", "lock-error", "no-store",
        "exception", "timeout", "incomplete", "throttled", "informational",
    }
)  # fmt: skip

# A coding system is a URI or URN; a code is a short token. Anything else is dropped.
_SYSTEM = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[A-Za-z0-9._~:/?#\[\]@!$&()*+,;=%-]{1,200}")
_CODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}")
# The element-path prefix of a FHIRPath expression: `Patient.name[0].given`. Whatever follows
# (`.where(value='…')`, literals, operators) may quote patient data and is cut off.
_STEP = r"[A-Za-z][A-Za-z0-9_]{0,63}(?![A-Za-z0-9_(])(?:\[\d{1,4}\])?"
_PATH = re.compile(rf"{_STEP}(?:\.{_STEP}){{0,15}}")


@dataclass(frozen=True, slots=True)
class IssueSummary:
    """One OperationOutcome.issue without its free text."""

    severity: str
    code: str
    coding: tuple[str, ...] = ()
    expression: tuple[str, ...] = ()
    location: tuple[str, ...] = ()

    def __str__(self) -> str:
        text = f"{self.severity}/{self.code}"
        if self.coding:
            text += " [" + ", ".join(self.coding) + "]"
        paths = self.expression or self.location
        if paths:
            text += " @ " + ", ".join(paths)
        return text

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"severity": self.severity, "code": self.code}
        if self.coding:
            out["coding"] = list(self.coding)
        if self.expression:
            out["expression"] = list(self.expression)
        if self.location:
            out["location"] = list(self.location)
        return out


@dataclass(frozen=True, slots=True)
class OutcomeSummary:
    """Up to MAX_ISSUES issues of a server's OperationOutcome; `dropped` counts the rest."""

    issues: tuple[IssueSummary, ...] = ()
    dropped: int = 0

    def __bool__(self) -> bool:
        return bool(self.issues)

    def __str__(self) -> str:
        text = "; ".join(str(i) for i in self.issues)
        if self.dropped:
            text += f"; (+{self.dropped} more)"
        return text

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form for the ledger and the dead-letter record."""
        return {"issues": [i.to_dict() for i in self.issues], "dropped": self.dropped}


EMPTY_OUTCOME = OutcomeSummary()


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def _paths(value: object) -> tuple[str, ...]:
    out: list[str] = []
    for raw in _strings(value):
        match = _PATH.match(raw.strip())
        if match and match.group() not in out:
            out.append(match.group())
        if len(out) == MAX_PATHS:
            break
    return tuple(out)


def _codings(details: object) -> tuple[str, ...]:
    if not isinstance(details, dict):
        return ()
    codings = details.get("coding")
    out: list[str] = []
    for coding in codings if isinstance(codings, list) else ():
        if not isinstance(coding, dict):
            continue
        system, code = coding.get("system"), coding.get("code")
        if not (isinstance(code, str) and _CODE.fullmatch(code)):
            continue
        if isinstance(system, str) and _SYSTEM.fullmatch(system):
            out.append(f"{system}|{code}")
        else:
            out.append(code)
        if len(out) == MAX_CODINGS:
            break
    return tuple(out)


def _issue(raw: dict[str, Any]) -> IssueSummary:
    severity = raw.get("severity")
    code = raw.get("code")
    return IssueSummary(
        severity=severity if severity in SEVERITIES else "unknown",
        code=code if code in ISSUE_TYPES else "unknown",
        coding=_codings(raw.get("details")),
        expression=_paths(raw.get("expression")),
        location=_paths(raw.get("location")),
    )


def summarize_outcome(resource: object) -> OutcomeSummary:
    """The PHI-safe summary of an OperationOutcome; anything else gives an empty summary."""
    if not isinstance(resource, dict) or resource.get("resourceType") != "OperationOutcome":
        return EMPTY_OUTCOME
    raw_issues = resource.get("issue")
    issues = [i for i in raw_issues if isinstance(i, dict)] if isinstance(raw_issues, list) else []
    return OutcomeSummary(
        issues=tuple(_issue(i) for i in issues[:MAX_ISSUES]),
        dropped=max(0, len(issues) - MAX_ISSUES),
    )


class EhrError(FhirbridgeError):
    """The hospital FHIR server could not be used."""

    code = "ehr_error"
    http_status = 502
    issue_code = "exception"

    def __init__(
        self,
        message: str | None = None,
        *,
        status: int | None = None,
        summary: OutcomeSummary = EMPTY_OUTCOME,
    ) -> None:
        self.status = status
        self.summary = summary
        super().__init__(message)


class TransientError(EhrError):
    """The hospital FHIR server is unavailable for now; the request was not processed."""

    code = "ehr_unavailable"
    http_status = 503
    issue_code = "transient"

    def __init__(
        self,
        message: str | None = None,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        summary: OutcomeSummary = EMPTY_OUTCOME,
    ) -> None:
        self.retry_after = retry_after
        super().__init__(message, status=status, summary=summary)


class OutcomeUnknownError(EhrError):
    """A write may have reached the hospital FHIR server, but no answer came."""

    code = "ehr_outcome_unknown"
    http_status = 504
    issue_code = "timeout"


class RejectedError(EhrError):
    """The hospital FHIR server rejected the request."""

    code = "ehr_rejected"
    issue_code = "processing"


class ConflictError(RejectedError):
    """The hospital FHIR server holds another version of the resource."""

    code = "ehr_conflict"
    issue_code = "conflict"


class InvalidResponseError(EhrError):
    """The hospital FHIR server answered, but not with the FHIR resource asked for."""

    code = "ehr_invalid_response"
    issue_code = "processing"


class SearchLimitError(EhrError):
    """A search on the hospital FHIR server has more pages than allowed."""

    code = "ehr_search_limit"
    issue_code = "too-costly"
