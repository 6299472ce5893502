"""API keys: made, hashed and checked here; only their SHA-256 is ever configured.

A key is ``fbk_`` followed by 32 random bytes (``secrets.token_urlsafe``, 256 bits). With that
much entropy a fast, unsalted SHA-256 is the right hash: nobody can guess or brute-force a
256-bit secret from its digest, so a slow password hash (bcrypt, argon2) would only cost CPU on
every request and add nothing. Salt is not needed either: every key is already unique.

A presented key is hashed and compared with ``hmac.compare_digest`` against *every* configured
entry, with no early exit, so the time taken does not say which entry (or whether any) matched.
A client may have several entries (key rotation: add the new key, move the client, remove the
old one). The same key configured twice is refused at start-up rather than guessed between.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from typing import Any, Final

from fhirbridge.api.access import Principal
from fhirbridge.auth.config import AuthConfigError
from fhirbridge.settings import ApiKey

PREFIX: Final = "fbk_"
_RANDOM_BYTES: Final = 32
# Longer than any key we make (4 + 43 characters); anything longer is not hashed at all.
MAX_KEY_LENGTH: Final = 128


def new_key() -> str:
    """A fresh API key: ``fbk_`` + 256 random bits, base64url."""
    return PREFIX + secrets.token_urlsafe(_RANDOM_BYTES)


def looks_like_key(value: str) -> bool:
    """True for a string shaped like one of our keys (prefix, sane length)."""
    return value.startswith(PREFIX) and len(PREFIX) < len(value) <= MAX_KEY_LENGTH


def hash_key(key: str) -> str:
    """The hex SHA-256 of a key, as configured in FHIRBRIDGE_AUTH_API_KEYS."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def entry(key: str, client_id: str, scopes: Iterable[str]) -> dict[str, Any]:
    """The FHIRBRIDGE_AUTH_API_KEYS entry for a key (validated like the settings validate it)."""
    if not looks_like_key(key):
        raise ValueError(f"not an API key: it must start with {PREFIX!r}")
    checked = ApiKey.model_validate(
        {"client_id": client_id, "sha256": hash_key(key), "scopes": tuple(dict.fromkeys(scopes))}
    )
    return checked.model_dump(mode="json")


class ApiKeyVerifier:
    """Checks presented keys against the configured digests in constant time per entry."""

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self._keys = tuple(keys)
        digests = [k.sha256 for k in self._keys]
        if len(set(digests)) != len(digests):
            raise AuthConfigError("FHIRBRIDGE_AUTH_API_KEYS lists the same key more than once")

    def __bool__(self) -> bool:
        return bool(self._keys)

    def verify(self, key: str) -> Principal | None:
        """The key's principal, or None when no configured entry matches."""
        if not looks_like_key(key):
            return None
        digest = hash_key(key)
        found: ApiKey | None = None
        for candidate in self._keys:  # no early exit: every entry is compared
            if hmac.compare_digest(digest, candidate.sha256):
                found = candidate
        if found is None:
            return None
        return Principal(found.client_id, frozenset(found.scopes), "api-key")
