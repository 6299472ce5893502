"""Who may call what: the scopes, the route decorators that declare them, the calling principal.

Every view function declares its scope with `@requires(scope)` or is marked `@public`; the
authentication hook (fhirbridge.auth) refuses any route that declares neither, so a new route
is closed until someone decides who may call it. `by_type` raises the scope for some FHIR
resource types (AuditEvent needs sync.admin even where the rest of /fhir needs fhir.read).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar

from flask import g

SUBMISSIONS_WRITE: Final = "submissions.write"
FHIR_READ: Final = "fhir.read"
SYNC_ADMIN: Final = "sync.admin"
SCOPES: Final = (SUBMISSIONS_WRITE, FHIR_READ, SYNC_ADMIN)

AuthMethod = Literal["api-key", "jwt", "none", "console"]

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: an id safe to log and audit, and what it may do."""

    client_id: str
    scopes: frozenset[str]
    method: AuthMethod

    def may(self, scope: str) -> bool:
        return scope in self.scopes


# Used when authentication is off (loopback only): every scope, and an id that says so.
UNAUTHENTICATED: Final = Principal("unauthenticated-loopback", frozenset(SCOPES), "none")


@dataclass(frozen=True)
class Access:
    """A route's rule: public, or one scope (raised per FHIR resource type by `by_type`)."""

    scope: str | None
    by_type: Mapping[str, str]

    def scope_for(self, view_args: Mapping[str, Any] | None) -> str | None:
        rtype = (view_args or {}).get("rtype")
        if isinstance(rtype, str) and rtype in self.by_type:
            return self.by_type[rtype]
        return self.scope


def requires(scope: str, *, by_type: Mapping[str, str] | None = None) -> Callable[[F], F]:
    """Declare the scope a view needs (`by_type`: a stricter scope for some `rtype` values)."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}")

    def mark(view: F) -> F:
        view.fhirbridge_access = Access(scope, dict(by_type or {}))  # type: ignore[attr-defined]
        return view

    return mark


def public(view: F) -> F:
    """Declare a view open to anyone (health probes, the JWKS we publish)."""
    view.fhirbridge_access = Access(None, {})  # type: ignore[attr-defined]
    return view


def access_of(view: Callable[..., Any] | None) -> Access | None:
    """The rule a view declared, or None when it declared none (such a route is refused)."""
    return getattr(view, "fhirbridge_access", None)


def current_principal() -> Principal:
    """The caller of the current request (set by the authentication hook)."""
    principal: Principal = g.get("fhirbridge_principal", UNAUTHENTICATED)
    return principal
