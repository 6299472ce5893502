"""The real FHIR server and fault proxy of tests/integration, for the console's browser test."""

from tests.integration.conftest import fault_proxy, fhir_server, make_fhir_server

__all__ = ["fault_proxy", "fhir_server", "make_fhir_server"]
