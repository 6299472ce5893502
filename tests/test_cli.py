"""The `fhirbridge` console script: map, mappings validate, and serve (a real process)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from click.testing import CliRunner

from fhirbridge.cli import main

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "mappings/fixtures/medicine-session.in.json"


def test_map_prints_a_transaction_bundle() -> None:
    result = CliRunner().invoke(main, ["map", str(FIXTURE)])
    assert result.exit_code == 0, result.output
    bundle = json.loads(result.stdout)
    assert bundle["type"] == "transaction" and len(bundle["entry"]) == 27
    # the unmapped adverse-event term is reported on stderr, not dropped
    assert "not in table adverse-event-terms; kept as text" in result.stderr


def test_map_trace_names_a_rule_for_every_leaf() -> None:
    result = CliRunner().invoke(main, ["map", "--trace", str(FIXTURE)])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    for entry in out["bundle"]["entry"]:
        resource = entry["resource"]
        rows = out["trace"][f"{resource['resourceType']}/{resource['id']}"]
        assert rows and all(r["rule"] and r["file"].startswith("rules/") for r in rows)


def test_map_reads_stdin_and_reports_problems_with_paths() -> None:
    doc = json.loads(FIXTURE.read_text())
    doc["doses"][0]["amountMg"] = "eighty"
    result = CliRunner().invoke(main, ["map", "-"], input=json.dumps(doc))
    assert result.exit_code == 1
    assert "doses[0].amountMg: must be of type number" in result.stderr
    assert "eighty" not in result.output
    malformed = CliRunner().invoke(main, ["map", "-"], input="{nope")
    assert malformed.exit_code == 1 and "malformed JSON at line 1" in malformed.stderr


def test_mappings_validate_ok_and_broken(tmp_path: Path) -> None:
    ok = CliRunner().invoke(main, ["mappings", "validate", str(ROOT / "mappings")])
    assert ok.exit_code == 0 and ok.stdout.startswith("fhirbridge-source-v1 v1:")
    broken = tmp_path / "pack"
    subprocess.run(["cp", "-r", str(ROOT / "mappings"), str(broken)], check=True)
    rule = broken / "rules/vital.Observation.yaml"
    rule.write_text(
        rule.read_text()
        .replace("value: $.heartRate", "value: $.hartRate", 1)
        .replace("$const.loinc", "$const.lonic", 1)
    )
    result = CliRunner().invoke(main, ["mappings", "validate", str(broken)])
    assert result.exit_code == 2
    assert "rules/vital.Observation.yaml:" in result.stderr and "unknown constant" in result.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_starts_on_sqlite_and_answers(tmp_path: Path) -> None:
    port = _free_port()
    env = {**os.environ, "FHIRBRIDGE_DATABASE_URL": f"sqlite:///{tmp_path / 'serve.db'}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fhirbridge.cli", "serve", "--port", str(port), "--workers", "1"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    assert r.status == 200
                    break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                assert time.monotonic() < deadline, "server did not become ready"
                time.sleep(0.2)
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/v1/submissions",
            data=FIXTURE.read_bytes(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 201
            assert json.loads(r.read())["outcome"] == "accepted"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()
