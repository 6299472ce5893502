"""SMART Backend Services end to end: a `fhirbridge worker` authenticates to a real FHIR server.

sekmet-fhir is both the authorization server and the FHIR server: its token endpoint
(``/auth/token``) verifies our signed client assertion against the JWK Set we registered with
it (``fhirbridge.ehr.auth.jwks``, what fhirbridge publishes), and its ``/fhir`` endpoint refuses
every request without an access token it issued (``server_auth.types: [smart]``). A recording
proxy in front of it (sekmet's ``base_url`` names the proxy, so the token URL, the assertion's
``aud`` and the access token's audience all agree) shows what went over the wire: exactly one
token request for the whole sync, and that token on every FHIR request.

The private key is generated here, written to a file and named in the targets file through
``${SMART_KEY_FILE}``, as in production.
"""

from __future__ import annotations

import http.client
import json
import threading
import uuid
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from fhirbridge.ehr.auth import CLIENT_ASSERTION_TYPE, SmartBackendConfig, jwks, parse_auth_config
from fhirbridge.store.resources import ResourceStore
from fhirbridge.sync.outbox import Outbox, Route
from fhirbridge.sync.targets import load_targets
from tests.integration.conftest import MakeFhirServer
from tests.integration.sync_support import (
    PER_SUBMISSION,
    SHARED,
    WorkerProcess,
    by_type,
    mapped,
    queue,
    server_resources,
    statuses,
    strip_meta,
    wait_until,
    write_targets,
)

pytestmark = pytest.mark.integration

CLIENT_ID = "fhirbridge-smart-e2e"
KID = "fhirbridge-rs384-e2e"
SCOPE = "system/*.*"
SUBMISSIONS = 5  # five patients: five transactions, one access token
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "content-length"}
)


@dataclass(frozen=True)
class Exchange:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int
    answer: bytes


class RecordingProxy:
    """A reverse proxy on 127.0.0.1 that forwards everything upstream and records it."""

    def __init__(self) -> None:
        self.upstream_port: int | None = None
        self._lock = threading.Lock()
        self._exchanges: list[Exchange] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 10  # an idle keep-alive connection is dropped

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _relay(self) -> None:
                assert proxy.upstream_port is not None
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=30)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    resp = upstream.getresponse()
                    answer, status, answer_headers = resp.read(), resp.status, resp.getheaders()
                finally:
                    upstream.close()
                with proxy._lock:
                    proxy._exchanges.append(
                        Exchange(self.command, self.path, dict(self.headers), body, status, answer)
                    )
                self.send_response(status)
                for k, v in answer_headers:
                    if k.lower() not in HOP_BY_HOP and k.lower() not in ("date", "server"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _relay

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def exchanges(self) -> list[Exchange]:
        with self._lock:
            return list(self._exchanges)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


@pytest.fixture
def proxy() -> Any:
    p = RecordingProxy()
    try:
        yield p
    finally:
        p.close()


def test_smart_backend_services_one_token_for_the_whole_sync(
    tmp_path: Path, make_fhir_server: MakeFhirServer, proxy: RecordingProxy
) -> None:
    # --- our key, in a file, named through ${SMART_KEY_FILE}
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_file = tmp_path / "smart-key.pem"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    base = f"http://127.0.0.1:{proxy.port}"
    token_url = f"{base}/auth/token"
    env = {
        "SMART_CLIENT_ID": CLIENT_ID,
        "SMART_KEY_FILE": str(key_file),
        "SMART_TOKEN_URL": token_url,
    }
    targets_file = write_targets(
        tmp_path / "targets.yaml",
        [
            {
                "name": "ehr",
                "base_url": f"{base}/fhir",
                "profile": "generic-r4",
                "timeout": 10,
                "auth": {
                    "type": "smart_backend",
                    "token_url": "${SMART_TOKEN_URL}",
                    "client_id": "${SMART_CLIENT_ID}",
                    "private_key_file": "${SMART_KEY_FILE}",
                    "alg": "RS384",
                    "kid": KID,
                    "scope": SCOPE,
                },
            }
        ],
    )
    config = parse_auth_config(load_targets(targets_file, environ=env)[0].auth)
    assert isinstance(config, SmartBackendConfig)
    our_jwks = jwks([config])  # what fhirbridge publishes at FHIRBRIDGE_JWKS_PATH

    # --- the hospital: sekmet requires a SMART access token and knows our public key
    admin = f"test-admin-{uuid.uuid4().hex}"  # for this test's own reads only
    server = make_fhir_server(
        extra_settings={
            "base_url": f"{base}/fhir",
            "server_auth": {
                "types": ["smart", "bearer"],
                "tokens": [admin],
                "smart_clients": [{"client_id": CLIENT_ID, "jwks": our_jwks, "scopes": SCOPE}],
            },
        }
    )
    proxy.upstream_port = server.port
    assert server.request("GET", "Patient").status_code == 401  # no token, no data
    as_admin = {"Authorization": f"Bearer {admin}"}

    # --- sync five patients through a `fhirbridge worker` process
    db = tmp_path / "fb.db"
    store = ResourceStore.from_url(f"sqlite:///{db}")
    store.create_schema()
    total = SUBMISSIONS * PER_SUBMISSION + SHARED
    worker = WorkerProcess(
        tmp_path / "worker.log",
        {
            **env,
            "FHIRBRIDGE_TARGETS": str(targets_file),
            "FHIRBRIDGE_DATABASE_URL": f"sqlite:///{db}",
            "FHIRBRIDGE_WORKER_IDLE_SECONDS": "0.1",
        },
    )
    try:
        ours = queue(store, Outbox(store, [Route("ehr")]), mapped(SUBMISSIONS))
        assert len(ours) == total
        worker.start()
        wait_until(
            lambda: statuses(store) == {"sent": total},
            timeout=30,
            what="every row sent",
            on_timeout=lambda: f"ledger {dict(statuses(store))}; log:\n{worker.log_tail()}",
        )
        assert worker.stop() == 0, worker.log_tail()
    finally:
        worker.kill()
        store.close()

    # --- delivered: everything, with our content
    for rtype, n in by_type(ours).items():
        found = {r["id"]: r for r in server_resources(server, rtype, as_admin)}
        assert len(found) == n, rtype
        for mine in (r for r in ours if r["resourceType"] == rtype):
            assert strip_meta(found[mine["id"]]) == strip_meta(mine)

    # --- on the wire: one token request, then that token on every FHIR request
    exchanges = proxy.exchanges
    token_requests = [e for e in exchanges if e.path == "/auth/token"]
    fhir_requests = [e for e in exchanges if e.path.startswith("/fhir")]
    assert len(token_requests) == 1, [(e.method, e.path) for e in exchanges]
    (token_request,) = token_requests
    assert token_request.method == "POST" and token_request.status == 200
    assert exchanges[0] is token_request  # fetched before the first FHIR request, not after a 401
    answer = json.loads(token_request.answer)
    assert answer["token_type"].lower() == "bearer" and answer["expires_in"] > 0
    writes = Counter(e.method for e in fhir_requests)
    assert writes["POST"] == SUBMISSIONS  # one transaction per patient
    assert {e.headers.get("Authorization") for e in fhir_requests} == {
        f"Bearer {answer['access_token']}"
    }
    assert {e.status for e in fhir_requests} == {200}

    # --- the client assertion: form, header, signature against our JWKS, claims
    form = {k: v[0] for k, v in parse_qs(token_request.body.decode()).items()}
    assert token_request.headers.get("Content-Type") == "application/x-www-form-urlencoded"
    assert form.keys() == {"grant_type", "client_assertion_type", "client_assertion", "scope"}
    assert form["grant_type"] == "client_credentials"
    assert form["client_assertion_type"] == CLIENT_ASSERTION_TYPE
    assert form["scope"] == SCOPE
    assertion = form["client_assertion"]
    header = jwt.get_unverified_header(assertion)
    assert header == {"alg": "RS384", "kid": KID, "typ": "JWT"}
    (jwk,) = [k for k in our_jwks["keys"] if k["kid"] == header["kid"]]
    assert "d" not in jwk  # the published set holds no private member
    claims = jwt.decode(
        assertion,
        jwt.PyJWK(jwk, algorithm="RS384"),
        algorithms=["RS384"],
        audience=token_url,
        issuer=CLIENT_ID,
        options={"require": ["iss", "sub", "aud", "exp", "iat", "jti"]},
    )
    assert claims["sub"] == claims["iss"] == CLIENT_ID
    assert claims["aud"] == token_url
    assert 0 < claims["exp"] - claims["iat"] <= 300
    assert uuid.UUID(claims["jti"]).version == 4
    # the server checked what we checked: the same assertion again is a replay, and the same
    # claims signed with a key that is not in our JWKS are refused
    replay = requests.post(token_url, data=form, timeout=10)
    assert replay.status_code == 401 and replay.json()["error"] == "invalid_client"
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(
        {**claims, "jti": str(uuid.uuid4())}, other, algorithm="RS384", headers={"kid": KID}
    )
    refused = requests.post(token_url, data={**form, "client_assertion": forged}, timeout=10)
    assert (
        refused.status_code == 401 and "verification failed" in refused.json()["error_description"]
    )
