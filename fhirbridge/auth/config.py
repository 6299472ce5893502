"""Is authentication configured, and is its configuration usable (checked once, at start-up)."""

from __future__ import annotations

from fhirbridge.settings import Settings


class AuthConfigError(ValueError):
    """The authentication settings contradict each other or cannot be used (start-up error)."""


def auth_configured(settings: Settings) -> bool:
    """True when API keys or a JWT key source (JWKS URL or PEM key) are configured."""
    return bool(
        settings.auth_api_keys or settings.auth_jwt_jwks_url or settings.auth_jwt_public_key
    )
