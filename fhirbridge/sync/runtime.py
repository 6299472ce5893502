"""Build what the worker needs for each configured target: capabilities, an HTTP client, auth.

The `auto` profile reads the target's CapabilityStatement once, when the worker starts, and
keeps it for the life of the process.
"""

from __future__ import annotations

from collections.abc import Sequence

import requests

from fhirbridge.ehr.auth import build_auth, parse_auth_config, tls_verify
from fhirbridge.ehr.client import EhrClient
from fhirbridge.sync.capabilities import Capabilities, from_capability_statement, load_profile
from fhirbridge.sync.outbox import Route
from fhirbridge.sync.targets import Target
from fhirbridge.sync.worker import TargetRuntime


def routes(targets: Sequence[Target]) -> list[Route]:
    """Which resource types go to which target (what enqueue needs)."""
    return [Route(t.name, frozenset(t.resource_types)) for t in targets]


def build_runtime(target: Target) -> TargetRuntime:
    """An authenticated client and the capabilities of one target."""
    session = requests.Session()
    verify = tls_verify(target.ca_bundle)
    auth = build_auth(parse_auth_config(target.auth), session=session, verify=verify)
    client = EhrClient(
        target.base_url,
        session=session,
        auth=auth,
        timeout=(min(10.0, target.timeout), target.timeout),
        verify=verify,
    )
    caps: Capabilities
    if target.profile == "auto":
        caps = from_capability_statement(client.capabilities())
    else:
        caps = load_profile(target.profile)
    return TargetRuntime(target, caps, client)


def build_runtimes(targets: Sequence[Target]) -> list[TargetRuntime]:
    return [build_runtime(t) for t in targets]
