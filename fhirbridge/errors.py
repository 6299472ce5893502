"""The one error tree of fhirbridge; every error carries FHIR issues and an HTTP status.

    FhirbridgeError                 500  exception   (never raised for bad input)
    ├── BadRequestError             400  invalid     malformed JSON, bad search parameter
    ├── UnauthorizedError           401  login       no or bad credentials (+ WWW-Authenticate)
    ├── ForbiddenError              403  forbidden   authenticated, but not allowed this route
    ├── NotFoundError               404  not-found
    ├── GoneError                   410  deleted
    ├── UnsupportedMediaTypeError   415  not-supported
    ├── InputInvalidError           422  invalid     submission fails the source schema or its rules
    ├── OutputInvalidError          422  processing  the mapping produced FHIR that fails validation
    └── MappingConfigError          --   a broken mapping pack (raised at load; names file + path)

Messages and diagnostics never carry patient values: they name paths, rules and expectations.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True, slots=True)
class Issue:
    """One OperationOutcome.issue: what went wrong (no patient data) and where."""

    diagnostics: str
    expression: tuple[str, ...] = ()
    code: str = "invalid"
    severity: str = "error"

    def to_fhir(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "severity": self.severity,
            "code": self.code,
            "diagnostics": self.diagnostics,
        }
        if self.expression:
            out["expression"] = list(self.expression)
        return out


def operation_outcome(issues: Iterable[Issue]) -> dict[str, Any]:
    """An OperationOutcome resource for the given issues (at least one issue, as FHIR requires)."""
    items = [i.to_fhir() for i in issues]
    if not items:
        items = [Issue("no details", code="unknown").to_fhir()]
    return {"resourceType": "OperationOutcome", "issue": items}


class FhirbridgeError(Exception):
    """Internal error."""

    code = "internal"
    http_status = 500
    issue_code = "exception"
    #: Extra HTTP response headers (WWW-Authenticate on 401 and 403); none by default.
    headers: Mapping[str, str] = MappingProxyType({})

    def __init__(self, message: str | None = None, issues: Sequence[Issue] = ()) -> None:
        self.message = message or (self.__doc__ or self.code).strip().splitlines()[0]
        self.issues: tuple[Issue, ...] = tuple(issues) or (
            Issue(self.message, code=self.issue_code),
        )
        super().__init__(self.message)

    def outcome(self) -> dict[str, Any]:
        return operation_outcome(self.issues)


class BadRequestError(FhirbridgeError):
    """The request is malformed."""

    code = "bad_request"
    http_status = 400
    issue_code = "invalid"


class UnauthorizedError(FhirbridgeError):
    """Authentication required: send an API key or a bearer token."""

    code = "unauthorized"
    http_status = 401
    issue_code = "login"

    def __init__(self, message: str | None = None, *, challenge: str) -> None:
        super().__init__(message)
        self.headers = MappingProxyType({"WWW-Authenticate": challenge})


class ForbiddenError(FhirbridgeError):
    """Not allowed: the caller lacks the scope this route needs."""

    code = "forbidden"
    http_status = 403
    issue_code = "forbidden"

    def __init__(self, message: str | None = None, *, challenge: str | None = None) -> None:
        super().__init__(message)
        if challenge:
            self.headers = MappingProxyType({"WWW-Authenticate": challenge})


class NotFoundError(FhirbridgeError):
    """Resource not found."""

    code = "not_found"
    http_status = 404
    issue_code = "not-found"


class GoneError(FhirbridgeError):
    """Resource deleted."""

    code = "gone"
    http_status = 410
    issue_code = "deleted"


class UnsupportedMediaTypeError(FhirbridgeError):
    """Unsupported content type: send application/json or application/fhir+json."""

    code = "unsupported_media_type"
    http_status = 415
    issue_code = "not-supported"


class InputInvalidError(FhirbridgeError):
    """The submission is invalid."""

    code = "input_invalid"
    http_status = 422
    issue_code = "invalid"


class OutputInvalidError(FhirbridgeError):
    """The mapping produced FHIR that fails validation."""

    code = "fhir_invalid"
    http_status = 422
    issue_code = "processing"


@dataclass
class MappingProblem:
    """One problem in a mapping pack: file, JSON pointer inside it, line, and what is wrong."""

    file: str
    pointer: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.pointer or '/'}: {self.message}"


@dataclass
class MappingConfigError(Exception):
    """A mapping pack failed to load; every problem names its file, path and line."""

    problems: list[MappingProblem] = field(default_factory=list)

    def __str__(self) -> str:
        return "mapping pack is invalid:\n" + "\n".join(f"  {p}" for p in self.problems)
