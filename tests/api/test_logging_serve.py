"""The server end to end: gunicorn's own lines and ours are all JSON on stderr.

Both ways the service runs: `fhirbridge serve`, and the container's bare gunicorn with
fhirbridge/gunicorn_conf.py. A real process (one worker) on a free loopback port, configured as
in production (an API key, so no development banner), one search with patient values in its
query, then SIGTERM; every line it wrote must be a JSON object.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from fhirbridge.auth.apikeys import entry
from tests.logcapture import json_lines

KEY = "fbk_" + "s" * 43


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.parametrize("launcher", ["fhirbridge serve", "gunicorn -c gunicorn_conf"])
def test_the_server_writes_json_lines_only(tmp_path: Path, launcher: str) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRBRIDGE_")}
    env.update(
        FHIRBRIDGE_DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite'}",
        FHIRBRIDGE_DB_AUTO_UPGRADE="true",
        FHIRBRIDGE_LOG_LEVEL="DEBUG",
        FHIRBRIDGE_LOG_FORMAT="json",
        FHIRBRIDGE_AUTH_API_KEYS=json.dumps([entry(KEY, "e2e-client", ["fhir.read"])]),
    )
    log_path = tmp_path / "serve.log"
    if launcher == "fhirbridge serve":
        command = [sys.executable, "-m", "fhirbridge.cli", "serve", "--port", str(port)]
        command += ["--workers", "1", "--no-worker"]
    else:
        gunicorn = [sys.executable, "-m", "gunicorn", "-c", "python:fhirbridge.gunicorn_conf"]
        command = [*gunicorn, "fhirbridge:create_app()"]
        env["GUNICORN_CMD_ARGS"] = f"--bind 127.0.0.1:{port} --workers 1"
        env["FHIRBRIDGE_MAPPINGS_DIR"] = str(Path(__file__).resolve().parents[2] / "mappings")
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            command,
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, log_path.read_text(errors="replace")[-3000:]
                try:
                    if requests.get(f"{base}/healthz", timeout=2).status_code == 200:
                        break
                except requests.RequestException:  # not listening yet, or still booting
                    pass
                assert time.monotonic() < deadline, "fhirbridge serve did not answer /healthz"
                time.sleep(0.2)
            resp = requests.get(
                f"{base}/fhir/Patient?name=Synthetic-Okafor&birthdate=1984-07-19",
                headers={"X-Request-ID": "e2e-1", "X-API-Key": KEY},
                timeout=10,
            )
            assert resp.status_code == 200 and resp.headers["X-Request-ID"] == "e2e-1"
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:  # pragma: no cover - gunicorn stops on SIGTERM
                proc.kill()
                proc.wait(10)
    text = log_path.read_text(encoding="utf-8")
    lines = json_lines(text)
    by_logger = {(line["logger"], line["message"].split(" ", 1)[0]) for line in lines}
    assert ("gunicorn.error", "Starting") in by_logger  # "Starting gunicorn 23.0.0"
    if launcher == "fhirbridge serve":
        assert ("fhirbridge.cli", "fhirbridge") in by_logger  # "fhirbridge serving on ..."
    access = [
        line
        for line in lines
        if line["logger"] == "fhirbridge.access" and line.get("request_id") == "e2e-1"
    ]
    assert [(a["route"], a["status"], a["client_id"]) for a in access] == [
        ("/fhir/<rtype>", 200, "e2e-client")
    ]
    for value in ("Synthetic-Okafor", "1984-07-19"):
        assert value not in text
