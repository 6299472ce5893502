"""`fhirbridge sync`: plan (sends nothing), status, dead-letters, replay; targets-file errors.

Every target points at a loopback port nothing listens on, and every HTTP request made in the
process is recorded and refused: a plan that sent anything would show up in `sent`.
"""

from __future__ import annotations

import copy
import json
import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner, Result

from fhirbridge import create_app
from fhirbridge.cli import main
from fhirbridge.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "mappings/fixtures/medicine-session.in.json"
SECRET = "sentinel-cli-token-42b7e1"
PATIENT_FAMILY = "Synthetic-Okafor"


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


class Env:
    def __init__(self, tmp_path: Path) -> None:
        port = _unused_port()
        self.base = f"http://127.0.0.1:{port}"
        self.targets = tmp_path / "targets.yaml"
        self.targets.write_text(
            f"""\
targets:
  - name: research
    base_url: {self.base}/research
    profile: generic-r4
    auth: {{type: bearer, token: "${{SYNC_CLI_TOKEN}}"}}
  - name: epic
    base_url: {self.base}/epic
    profile: epic
    patient_identifier: {{system: "urn:oid:1.2.840.114350.1.13.0.1.7.5.737384.14"}}
  - name: oracle
    base_url: {self.base}/oracle
    profile: oracle-health
    patient_identifier: {{system: "urn:oid:2.16.840.1.113883.3.13.6"}}
  - name: auto-ehr
    base_url: {self.base}/auto
    profile: auto
"""
        )
        self.database_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
        self.env = {
            "FHIRBRIDGE_TARGETS": str(self.targets),
            "FHIRBRIDGE_DATABASE_URL": self.database_url,
            "SYNC_CLI_TOKEN": SECRET,
        }

    def run(self, *args: str, env: dict[str, Any] | None = None, **kw: Any) -> Result:
        return CliRunner().invoke(main, ["sync", *args], env={**self.env, **(env or {})}, **kw)


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every HTTP request attempted (method, URL); each is refused as if nothing listened."""
    calls: list[tuple[str, str]] = []

    def refuse(self: requests.Session, request: Any, **kw: Any) -> Any:
        calls.append((request.method, request.url))
        raise requests.ConnectionError("refused by the test")

    monkeypatch.setattr(requests.Session, "send", refuse)
    return calls


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    monkeypatch.delenv("FHIRBRIDGE_TARGETS", raising=False)
    return Env(tmp_path)


@pytest.fixture
def service(env: Env, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The service on the same database and targets, with the fixture submitted."""
    monkeypatch.setenv("SYNC_CLI_TOKEN", SECRET)
    app = create_app(
        Settings(
            database_url=env.database_url,
            mappings_dir=ROOT / "mappings",
            targets=env.targets,
            db_auto_upgrade=True,
        )
    )
    with app.test_client() as client:
        resp = client.post(
            "/api/v1/submissions", data=FIXTURE.read_bytes(), content_type="application/json"
        )
        assert resp.status_code == 201
        yield app.extensions["fhirbridge"], resp.json
    app.extensions["fhirbridge"].store.close()


def _clean(result: Result) -> None:
    assert SECRET not in result.output
    assert PATIENT_FAMILY not in result.stdout


def test_plan_generic_r4_is_one_transaction_of_puts(env: Env, sent: list[Any]) -> None:
    result = env.run("plan", str(FIXTURE), "--target", "research")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "target research (profile generic-r4): 1 steps, 27 writes — 1 transaction"
    assert lines[1] == "  1. transaction: POST transaction Bundle of 27 entries"
    assert sum(line.strip().startswith("PUT ") for line in lines) == 27
    assert "as if nothing had been delivered to research yet" in result.stderr
    _clean(result)
    assert sent == []
    assert not (Path(env.database_url.removeprefix("sqlite:///"))).exists()  # creates nothing


def test_plan_epic_matches_the_patient_first(env: Env, sent: list[Any]) -> None:
    gated = env.run("plan", str(FIXTURE), "--target", "epic")
    assert gated.exit_code == 0, gated.output
    first, step1 = gated.stdout.splitlines()[:2]
    assert first == "target epic (profile epic): 27 steps, 0 writes — 1 match-patient, 26 wait"
    assert "GET Patient?identifier=urn:oid:1.2.840.114350.1.13.0.1.7.5.737384.14|…" in step1
    assert "--assume-patient" in gated.stderr

    matched = env.run(
        "plan",
        str(FIXTURE),
        "--target",
        "epic",
        "--assume-patient",
        "epic-pat-1",
        "--assume-encounter",
        "epic-enc-1",
    )
    assert matched.exit_code == 0, matched.output
    out = matched.stdout
    assert out.startswith("target epic (profile epic): 27 steps, 20 writes")
    assert "15 search-then-create" in out.splitlines()[0]
    assert "GET Observation?identifier=urn:fhirbridge:clinic-a:vital-heart-rate|…" in out
    assert "note for AdverseEvent/" in out and "POST DocumentReference" in out
    assert "skip Practitioner/" in out  # Epic cannot create it
    assert "PUT " not in out  # no update-as-create on Epic
    _clean(gated)
    _clean(matched)
    assert sent == []


def test_plan_oracle_health_uses_batches(env: Env, sent: list[Any]) -> None:
    text = env.run("plan", str(FIXTURE), "--target", "oracle", "--assume-patient", "o-1")
    assert text.exit_code == 0, text.output
    assert text.stdout.startswith("target oracle (profile oracle-health): ")
    assert "batch: POST batch Bundle of" in text.stdout
    assert "transaction" not in text.stdout
    assert "(unverifiable: dead-letter on an unknown outcome)" in text.stdout
    _clean(text)

    as_json = env.run(
        "plan", str(FIXTURE), "--target", "oracle", "--assume-patient", "o-1", "--json"
    )
    assert as_json.exit_code == 0, as_json.output
    plan = json.loads(as_json.stdout)
    assert (plan["target"], plan["profile"]) == ("oracle", "oracle-health")
    kinds = [s["kind"] for s in plan["steps"]]
    assert "batch" in kinds and "transaction" not in kinds
    batch = next(s for s in plan["steps"] if s["kind"] == "batch")
    assert batch["bundle"]["type"] == "batch"
    assert sent == []


def test_plan_auto_reads_only_metadata_or_uses_profile(env: Env, sent: list[Any]) -> None:
    overridden = env.run("plan", str(FIXTURE), "--target", "auto-ehr", "--profile", "generic-r4")
    assert overridden.exit_code == 0, overridden.output
    assert overridden.stdout.startswith("target auto-ehr (profile generic-r4): 1 steps, 27 writes")
    assert sent == []

    auto = env.run("plan", str(FIXTURE), "--target", "auto-ehr")
    assert auto.exit_code == 1
    assert "reading its CapabilityStatement" in auto.stderr
    assert "cannot read the CapabilityStatement of auto-ehr" in auto.stderr
    assert sent == [("GET", f"{env.base}/auto/metadata")]  # one read, nothing else


def test_plan_follows_the_ledger(env: Env, service: Any, sent: list[Any]) -> None:
    svc, _body = service
    outbox = svc.outbox
    now = datetime.now(UTC)
    claimed = outbox.claim("research", owner="t", now=now)
    assert len(claimed) == 27
    for row in claimed:
        assert outbox.record(
            "research",
            row.key,
            owner="t",
            version=1,
            status="sent",
            now=now,
            server_id=row.resource_id,
        )
    done = env.run("plan", str(FIXTURE), "--target", "research")
    assert done.exit_code == 0, done.output
    assert done.stdout.splitlines() == [
        "target research (profile generic-r4): 0 steps, 0 writes",
        "  nothing to do",
    ]
    assert "using the ledger: 27 of 27 resources" in done.stderr

    fresh = env.run("plan", str(FIXTURE), "--target", "research", "--fresh")
    assert "27 writes" in fresh.stdout.splitlines()[0]

    changed = copy.deepcopy(json.loads(FIXTURE.read_text()))
    changed["vitals"][0]["heartRate"] = 75
    update = env.run("plan", "-", "--target", "research", input=json.dumps(changed))
    assert update.exit_code == 0, update.output
    lines = update.stdout.splitlines()
    # the changed heart rate goes to its id on the server; the new import's Provenance is new
    assert lines[0] == (
        "target research (profile generic-r4): 2 steps, 2 writes — 1 transaction, 1 update"
    )
    assert lines[1].startswith("  1. PUT Observation/") and "(new version of" in lines[1]
    assert lines[3].strip().startswith("PUT Provenance/")
    assert sent == []


def test_status_dead_letters_and_replay(env: Env, service: Any, sent: list[Any]) -> None:
    svc, _body = service
    outbox = svc.outbox
    now = datetime.now(UTC)
    claimed = outbox.claim("research", owner="t", now=now)
    obs = sorted(r.key for r in claimed if r.resource_type == "Observation")
    error = "ehr_rejected 422: error/processing @ Observation.code"
    outbox.record("research", obs[0], owner="t", version=1, status="dead", now=now, error=error)
    outbox.record("research", obs[1], owner="t", version=1, status="retrying", now=now, error="x")
    outbox.release("research", [r.key for r in claimed][2:], owner="t", now=now)

    status = env.run("status")
    assert status.exit_code == 0, status.output
    lines = status.stdout.splitlines()
    assert lines[0] == f"research (generic-r4, {env.base}/research)"
    assert "failed 1, dead-lettered 1" in lines[1]
    assert (
        "last error: " in status.stdout and f"{obs[0][0]}/{obs[0][1]} (dead): {error}" in lines[4]
    )
    _clean(status)
    as_json = json.loads(env.run("status", "--json").stdout)
    research = as_json["targets"][0]
    assert research["deadLettered"] == 1 and research["target"]["auth"] == {"type": "bearer"}
    assert [t["name"] for t in as_json["targets"]] == ["research", "epic", "oracle", "auto-ehr"]

    listed = env.run("dead-letters", "--target", "research")
    assert listed.exit_code == 0
    assert listed.stdout.startswith(f"research {obs[0][0]}/{obs[0][1]} v1 attempts 1 at ")
    assert listed.stdout.rstrip().endswith(error)
    letters = json.loads(env.run("dead-letters", "--json").stdout)
    assert [(d["resourceType"], d["id"]) for d in letters] == [obs[0]]

    not_dead = env.run("replay", "--target", "research", f"{obs[1][0]}/{obs[1][1]}")
    assert not_dead.exit_code == 1 and "not a dead letter of research" in not_dead.stderr
    one = env.run("replay", "--target", "research", f"{obs[0][0]}/{obs[0][1]}")
    assert one.exit_code == 0 and one.stdout == "1 dead letter(s) of research queued again\n"
    again = env.run("replay", "--target", "research")
    assert again.exit_code == 0 and again.stdout.startswith("0 dead letter(s)")
    assert outbox.ledger("research", [obs[0]])[obs[0]].status == "queued"
    assert sent == []


def test_targets_file_problems_exit_2(env: Env, tmp_path: Path) -> None:
    missing = env.run("status", env={"FHIRBRIDGE_TARGETS": str(tmp_path / "nope.yaml")})
    assert missing.exit_code == 2 and "targets file is invalid" in missing.stderr
    unset = env.run("plan", str(FIXTURE), "--target", "research", env={"SYNC_CLI_TOKEN": None})
    assert unset.exit_code == 2
    assert "environment variable SYNC_CLI_TOKEN is not set" in unset.stderr
    none = env.run("dead-letters", env={"FHIRBRIDGE_TARGETS": None})
    assert none.exit_code == 2 and "set FHIRBRIDGE_TARGETS" in none.stderr
    unknown = env.run("replay", "--target", "nope")
    assert unknown.exit_code == 2 and "no target named 'nope'" in unknown.stderr
    bad_key = env.run("replay", "--target", "research", "Observation")
    assert bad_key.exit_code == 2 and "is not TYPE/ID" in bad_key.stderr
