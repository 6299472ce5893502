"""No authentication only on loopback: the rule `fhirbridge serve` and gunicorn_conf both apply.

With no API keys and no JWT key source every caller gets every scope. That is fine for a
developer on 127.0.0.1 and never for an address other machines can reach. `check_bind` is pure:
it takes gunicorn-style bind addresses (``HOST:PORT``, ``[IPv6]:PORT``, ``unix:PATH``,
``fd://N``) and answers with a warning to show (loopback, no auth), None (auth configured), or
raises BindRefused (a non-loopback address with no auth).

Only literal loopback addresses and ``localhost`` count as loopback; a host name is not
resolved. A Unix socket or an inherited file descriptor is refused too: whatever proxies it
(nginx, a sidecar) may well expose it to the network.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

WARNING = """\
WARNING: AUTHENTICATION IS OFF.
WARNING: every caller gets every scope (submissions.write, fhir.read, sync.admin) on {binds}.
WARNING: this is for development on loopback only; set FHIRBRIDGE_AUTH_API_KEYS
WARNING: (`fhirbridge auth new-key`) or FHIRBRIDGE_AUTH_JWT_* before handling real data."""


class BindRefused(Exception):
    """Serving a non-loopback address without authentication: refused at start-up."""


def host_of(bind: str) -> str | None:
    """The host part of a gunicorn bind address, None for unix: and fd:// binds."""
    if bind.startswith(("unix:", "fd://")):
        return None
    if bind.startswith("["):  # [::1]:8080
        return bind[1 : bind.find("]")] if "]" in bind else bind[1:]
    if bind.count(":") > 1:  # a bare IPv6 address, no port
        return bind
    return bind.rpartition(":")[0] if ":" in bind else bind


def is_loopback(bind: str) -> bool:
    """True when the bind address only accepts connections from this machine."""
    host = host_of(bind)
    if host is None or not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: not resolved, so not trusted to be loopback


def check_bind(binds: Iterable[str], auth_configured: bool) -> str | None:
    """None when auth is on; a loud warning for loopback-only with no auth; else BindRefused."""
    addresses = list(binds)
    if auth_configured:
        return None
    exposed = [b for b in addresses if not is_loopback(b)]
    if exposed or not addresses:
        raise BindRefused(
            f"refusing to serve {', '.join(exposed) or 'no address'} without authentication: "
            "only a loopback address (127.0.0.1, ::1, localhost) may run with auth off. "
            "Set FHIRBRIDGE_AUTH_API_KEYS (make a key with `fhirbridge auth new-key`) or "
            "FHIRBRIDGE_AUTH_JWT_JWKS_URL / FHIRBRIDGE_AUTH_JWT_PUBLIC_KEY with "
            "FHIRBRIDGE_AUTH_JWT_AUDIENCE."
        )
    return WARNING.format(binds=", ".join(addresses))
