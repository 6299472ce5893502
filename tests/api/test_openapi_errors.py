"""Every error answer is a FHIR OperationOutcome, even the deliberate ones outside the store.

openapi.yaml documents each 4xx/5xx as an OperationOutcome (tests/api/test_openapi.py checks
the spec; tests/api/test_schemathesis.py checks the answers the fuzzer can reach). These are
the answers a fuzzer cannot provoke.
"""

from __future__ import annotations

from flask import Flask

from fhirbridge.api import jwks, problems


def test_refusing_to_publish_private_keys_is_a_500_operation_outcome() -> None:
    app = Flask(__name__)
    problems.init_app(app)
    leaked = {"keys": [{"kty": "EC", "kid": "k1", "crv": "P-384", "x": "x", "y": "y", "d": "d"}]}
    app.register_blueprint(jwks.make_blueprint("/jwks.json", lambda: leaked))
    response = app.test_client().get("/jwks.json")
    assert response.status_code == 500 and response.mimetype == "application/fhir+json"
    assert response.json is not None
    assert response.json["resourceType"] == "OperationOutcome"
    assert [i["code"] for i in response.json["issue"]] == ["exception"]
    assert '"d"' not in response.get_data(as_text=True)
