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
from tests.integration.sync_support import distinct

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
    # The README's order: migrate, then serve (serve refuses a database behind head).
    subprocess.run(
        [sys.executable, "-m", "fhirbridge.cli", "db", "upgrade"],
        env=env,
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
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


def _ndjson(tmp_path: Path, docs: list[object]) -> Path:
    path = tmp_path / "in.ndjson"
    path.write_text("\n".join(d if isinstance(d, str) else json.dumps(d) for d in docs) + "\n")
    return path


def test_map_ndjson_streams_and_reports_bad_lines_by_number(tmp_path: Path) -> None:
    doc = json.loads(FIXTURE.read_text())
    bad = distinct(doc, 9)
    bad["vitals"][0]["heartRate"] = "Zelda-Quintessa"
    path = _ndjson(tmp_path, [distinct(doc, 1), "{broken", distinct(doc, 2), "", bad])
    result = CliRunner().invoke(main, ["map", str(path)])
    assert result.exit_code == 1
    lines = [json.loads(x) for x in result.stdout.splitlines()]
    assert len(lines) == 54 and all("resourceType" in x for x in lines)
    assert f"{path}:2: malformed JSON at column 2" in result.stderr
    assert f"{path}:5: vitals[0].heartRate: must be of type number" in result.stderr
    # the blank line 4 is not a submission
    assert "4 submissions: 2 mapped, 2 failed, 54 resources" in result.stderr
    assert "Zelda" not in result.output


def test_map_ndjson_to_one_bundle_deduplicates_shared_resources(tmp_path: Path) -> None:
    doc = json.loads(FIXTURE.read_text())
    path = _ndjson(tmp_path, [distinct(doc, 1), distinct(doc, 2)])
    result = CliRunner().invoke(main, ["map", "--output", "bundle", str(path)])
    assert result.exit_code == 0, result.stderr
    bundle = json.loads(result.stdout)
    ids = [(e["resource"]["resourceType"], e["resource"]["id"]) for e in bundle["entry"]]
    assert len(ids) == len(set(ids)) == 2 * 27 - 3  # 2 practitioners and 1 medication shared
    from fhirbridge.fhir.validate import OutputValidator

    assert OutputValidator().validate(bundle) == []


def test_map_ndjson_with_only_bad_lines_writes_a_valid_empty_bundle(tmp_path: Path) -> None:
    path = _ndjson(tmp_path, ["{broken"])
    result = CliRunner().invoke(main, ["map", "--output", "bundle", str(path)])
    assert result.exit_code == 1
    assert json.loads(result.stdout) == {"resourceType": "Bundle", "type": "transaction"}


def test_batch_reports_progress_per_line() -> None:
    import io
    from datetime import UTC, datetime

    from fhirbridge.batch import map_lines
    from fhirbridge.mapping.pack import load_pack

    doc = json.loads(FIXTURE.read_text())
    raw = [json.dumps(distinct(doc, i)).encode() + b"\n" for i in range(3)]
    seen: list[tuple[int, int]] = []
    out = io.BytesIO()
    stats = map_lines(
        raw,
        out,
        pack=load_pack(ROOT / "mappings"),
        now=lambda: datetime(2026, 1, 1, tzinfo=UTC),
        on_line=lambda n, size: seen.append((n, size)),
    )
    assert seen == [(i + 1, len(r)) for i, r in enumerate(raw)]
    assert stats.submissions == 3 and stats.failed == 0 and stats.resources == 81
    assert stats.unmapped == {"adverse-event-terms": 3}
