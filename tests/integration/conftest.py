"""Fixtures for integration tests against a real FHIR R4 server (sekmet-fhir) and a fault proxy.

- ``fhir_server``: a fresh sekmet process per test (own temp dir, port and SQLite db; about 0.7 s
  to start on 2 cores, so no shared server is needed). ``stop()``/``start()``/``kill()`` keep port
  and data; ``wipe()`` empties the db. Stopped at teardown.
- ``shared_fhir_server``: one sekmet process per test module, for tests that only add data with
  unique ids/identifiers and never stop it (saves the ~0.9 s start+stop per test). Call
  ``shared_fhir_server.wipe()`` (stop, delete the db, start: ~0.9 s) if a test needs it empty.
- ``make_fhir_server``: factory for more servers in one test, or other settings:
  ``make_fhir_server(extra_settings={"server_auth": {"types": ["bearer"], "tokens": ["t"]}})``.
- ``fault_proxy``: a ``FaultProxy`` in front of ``fhir_server`` (``fault_proxy.base_url``);
  closed (all threads joined) at teardown.

If sekmet-fhir is missing or cannot start, the fixtures skip; in CI (CI=true, or
FHIRBRIDGE_REQUIRE_SEKMET=1) they fail instead: the test extras install it, so a skip there
would hide a broken setup.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.fault_proxy import FaultProxy
from tests.integration.fhir_server import (
    SEKMET_REQUIREMENT,
    FhirServer,
    SekmetUnavailable,
    sekmet_installed,
)

MakeFhirServer = Callable[..., FhirServer]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "integration: starts a real FHIR server (sekmet-fhir) in a subprocess"
    )


def _unavailable(reason: str) -> None:
    if os.environ.get("FHIRBRIDGE_REQUIRE_SEKMET") == "1" or os.environ.get("CI") == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def make_fhir_server(tmp_path: Path) -> Iterator[MakeFhirServer]:
    """Factory: ``make_fhir_server(extra_settings=None, start=True) -> FhirServer``."""
    if not sekmet_installed():
        _unavailable(f"sekmet-fhir not installed: pip install {SEKMET_REQUIREMENT}")
    servers: list[FhirServer] = []

    def make(extra_settings: dict[str, Any] | None = None, start: bool = True) -> FhirServer:
        server = FhirServer(tmp_path / f"sekmet{len(servers)}", extra_settings=extra_settings)
        servers.append(server)
        if start:
            try:
                server.start()
            except SekmetUnavailable as e:
                _unavailable(f"sekmet-fhir could not be started: {e}")
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.close()


@pytest.fixture
def fhir_server(make_fhir_server: MakeFhirServer) -> FhirServer:
    """A running sekmet FHIR R4 server with an empty database, private to this test."""
    return make_fhir_server()


@pytest.fixture(scope="module")
def shared_fhir_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FhirServer]:
    """A running sekmet server shared by the tests of one module (data accumulates)."""
    if not sekmet_installed():
        _unavailable(f"sekmet-fhir not installed: pip install {SEKMET_REQUIREMENT}")
    server = FhirServer(tmp_path_factory.mktemp("sekmet-shared"))
    try:
        try:
            server.start()
        except SekmetUnavailable as e:
            _unavailable(f"sekmet-fhir could not be started: {e}")
        yield server
    finally:
        server.close()


@pytest.fixture
def fault_proxy(fhir_server: FhirServer) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of ``fhir_server``; nothing queued."""
    proxy = FaultProxy(fhir_server.base_url)
    try:
        yield proxy
    finally:
        proxy.close()
    assert not proxy.errors, "fault proxy handler errors:\n" + "\n".join(proxy.errors)
