"""create_app publishes the public keys of the configured SMART Backend Services targets."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fhirbridge import create_app
from fhirbridge.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_jwks_lists_the_smart_targets_public_keys_only(tmp_path: Path, monkeypatch) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "key.pem").write_bytes(pem)
    monkeypatch.setenv("EPIC_CLIENT_ID", "client-123")
    (tmp_path / "targets.yaml").write_text(f"""targets:
  - name: research
    base_url: https://research.example.org/fhir
    profile: generic-r4
  - name: epic
    base_url: https://epic.example.org/api/FHIR/R4
    profile: epic
    patient_identifier: {{system: "urn:oid:1.2.840.114350.1.13.0.1.7.5.737384.14"}}
    auth:
      type: smart_backend
      token_url: https://epic.example.org/oauth2/token
      client_id: ${{EPIC_CLIENT_ID}}
      private_key_file: {tmp_path / "key.pem"}
      alg: ES384
      kid: fhirbridge-2026
      scope: system/Observation.write
""")
    app = create_app(
        Settings(
            database_url="sqlite://",
            mappings_dir=ROOT / "mappings",
            targets=tmp_path / "targets.yaml",
            db_auto_upgrade=True,
        )
    )
    resp = app.test_client().get("/.well-known/jwks.json")
    app.extensions["fhirbridge"].store.close()
    assert resp.status_code == 200 and resp.headers["Cache-Control"] == "max-age=300"
    (jwk,) = resp.json["keys"]
    assert (jwk["kty"], jwk["crv"], jwk["kid"], jwk["alg"]) == (
        "EC",
        "P-384",
        "fhirbridge-2026",
        "ES384",
    )
    assert "d" not in jwk  # never the private part
    assert "client-123" not in resp.get_data(as_text=True)
