"""GET /metrics: HTTP, submission and mapping-error counters, and the sync ledger as gauges.

Scrapes are parsed with prometheus_client's own parser. The app's targets point at an
unreachable loopback port and no worker runs: the test moves ledger rows through the outbox
as a worker would. One test runs in multi-process mode with a second, real process.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, Response, request
from flask.testing import FlaskClient
from prometheus_client import CONTENT_TYPE_LATEST, values
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine

from fhirbridge import create_app
from fhirbridge.api.access import SYNC_ADMIN, access_of
from fhirbridge.errors import InputInvalidError, Issue, OutputInvalidError
from fhirbridge.metrics import LEDGER_STATES, SyncCollector, error_rules
from fhirbridge.settings import Settings
from fhirbridge.store.resources import ResourceStore
from fhirbridge.sync.outbox import Outbox, Route
from tests.store.conftest import store  # noqa: F401 - SQLite and, when reachable, PostgreSQL

ROOT = Path(__file__).resolve().parents[2]
DOC: dict[str, Any] = json.loads((ROOT / "mappings/fixtures/medicine-session.in.json").read_text())
PATIENT_FAMILY = "Synthetic-Okafor"  # a patient value from the fixture: never in a label
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

TARGETS = """\
targets:
  - name: ehr
    base_url: http://127.0.0.1:9/fhir
    profile: generic-r4
  - name: vitals
    base_url: http://127.0.0.1:9/vitals
    profile: generic-r4
    resource_types: [Observation]
"""

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _settings(tmp_path: Path, **overrides: Any) -> Settings:
    targets = tmp_path / "targets.yaml"
    targets.write_text(TARGETS)
    fields: dict[str, Any] = {
        "database_url": f"sqlite:///{tmp_path / 'db.sqlite'}",
        "mappings_dir": ROOT / "mappings",
        "targets": targets,
        "db_auto_upgrade": True,
    }
    return Settings(**(fields | overrides))


@pytest.fixture
def client(tmp_path: Path) -> Iterator[FlaskClient]:
    app = create_app(_settings(tmp_path))
    with app.test_client() as test_client:
        yield test_client
    app.extensions["fhirbridge"].store.close()


def _post(client: FlaskClient, doc: Any) -> Any:
    return client.post("/api/v1/submissions", data=json.dumps(doc), content_type="application/json")


def _scrape(client: FlaskClient) -> Samples:
    resp = client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == CONTENT_TYPE_LATEST
    text = resp.get_data(as_text=True)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _get(samples: Samples, name: str, **labels: str) -> float:
    """The sample's value; a KeyError (test failure) when the series is not exposed."""
    return samples[(name, tuple(sorted(labels.items())))]


def _series(samples: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def test_metrics_route_needs_sync_admin(client: FlaskClient) -> None:
    access = access_of(client.application.view_functions["metrics.metrics"])
    assert access is not None and access.scope == SYNC_ADMIN


def test_submissions_reads_and_ledger(client: FlaskClient) -> None:
    before = _scrape(client)
    for outcome in ("created", "unchanged", "rejected"):  # every outcome exists from the start
        assert _get(before, "fhirbridge_submissions_total", outcome=outcome) == 0
    assert _get(before, "fhirbridge_mapping_errors_total", rule="input-schema") == 0
    assert _get(before, "fhirbridge_sync_resources", target="ehr", state="queued") == 0

    created = _post(client, DOC)
    assert created.status_code == 201
    assert _post(client, DOC).status_code == 200
    bad = copy.deepcopy(DOC)
    bad["sessions"][0]["type"] = "unknown-session-type"
    bad["doses"][1]["sessionId"] = "no-such-session"
    rejected = _post(client, bad)
    assert rejected.status_code == 422
    problems = len(rejected.json["issue"])
    assert problems >= 2
    malformed = client.post("/api/v1/submissions", data="{", content_type="application/json")
    assert malformed.status_code == 400

    patient = next(r for r in created.json["resources"] if r["resourceType"] == "Patient")
    for _ in range(2):
        assert client.get(f"/fhir/Patient/{patient['id']}").status_code == 200
    assert client.get("/fhir/Patient/no-such-patient").status_code == 404
    assert client.get(f"/no-such-route/{PATIENT_FAMILY}").status_code == 404
    assert client.delete("/healthz").status_code == 405

    samples = _scrape(client)
    assert _get(samples, "fhirbridge_submissions_total", outcome="created") == 1
    assert _get(samples, "fhirbridge_submissions_total", outcome="unchanged") == 1
    assert _get(samples, "fhirbridge_submissions_total", outcome="rejected") == 2
    # one per problem of the input; malformed JSON is a rejection but no mapping error
    assert _get(samples, "fhirbridge_mapping_errors_total", rule="input-schema") == problems
    assert sum(_series(samples, "fhirbridge_mapping_errors_total").values()) == problems

    requests = "fhirbridge_http_requests_total"
    read = "/fhir/<rtype>/<rid>"
    assert _get(samples, requests, route=read, method="GET", status="200") == 2
    assert _get(samples, requests, route=read, method="GET", status="404") == 1
    post = {"route": "/api/v1/submissions", "method": "POST"}
    assert [_get(samples, requests, **post, status=s) for s in ("201", "200", "422", "400")] == [
        1,
        1,
        1,
        1,
    ]
    assert _get(samples, requests, route="<unmatched>", method="GET", status="404") == 1
    assert _get(samples, requests, route="<unmatched>", method="DELETE", status="405") == 1
    assert _get(samples, requests, route="/metrics", method="GET", status="200") == 1  # before

    duration = "fhirbridge_http_request_duration_seconds"
    assert _get(samples, f"{duration}_count", route=read, method="GET") == 3
    assert _get(samples, f"{duration}_bucket", route=read, method="GET", le="+Inf") == 3
    assert 0 < _get(samples, f"{duration}_sum", route=read, method="GET") < 60
    assert _get(samples, f"{duration}_count", **post) == 4

    # Labels are templates, rules and states: never an id or a value from a request.
    label_values = {v for (_, labels) in samples for _, v in labels}
    assert not any(patient["id"] in v or PATIENT_FAMILY in v for v in label_values)
    assert not any("no-such" in v or "unknown-session-type" in v for v in label_values)

    # The accepted submission's 27 resources are queued for ehr, its 15 Observations for vitals.
    for target, queued in (("ehr", 27), ("vitals", 15)):
        assert _get(samples, "fhirbridge_sync_resources", target=target, state="queued") == queued
        assert _get(samples, "fhirbridge_sync_queue_depth", target=target) == queued
        for state in set(LEDGER_STATES) - {"queued"}:
            assert _get(samples, "fhirbridge_sync_resources", target=target, state=state) == 0
        assert 0 <= _get(samples, "fhirbridge_sync_oldest_waiting_seconds", target=target) < 60
    assert _get(samples, "fhirbridge_sync_ledger_up") == 1


def test_ledger_moves_show_at_the_next_scrape(client: FlaskClient) -> None:
    body = _post(client, DOC).json
    outbox: Outbox = client.application.extensions["fhirbridge"].outbox
    now = datetime.now(UTC)
    claimed = outbox.claim("ehr", owner="test-worker", now=now)
    assert len(claimed) == 27
    observations = sorted(r["id"] for r in body["resources"] if r["resourceType"] == "Observation")
    for rid, status in zip(observations, ("sent", "sent", "dead", "retrying"), strict=False):
        assert outbox.record(
            "ehr", ("Observation", rid), owner="test-worker", version=1, status=status, now=now
        )
    # A version queued an hour ago and still waiting: the oldest row of the target.
    with outbox.store.write() as conn:
        outbox.enqueue_versions(
            conn,
            [("Observation", "queued-long-ago", 1)],
            patient_ref="Patient/x",
            now=now - timedelta(hours=1),
        )

    samples = _scrape(client)
    ehr = {
        dict(labels)["state"]: v
        for labels, v in _series(samples, "fhirbridge_sync_resources").items()
        if dict(labels)["target"] == "ehr"
    }
    assert ehr == {
        "queued": 1,
        "in_flight": 23,
        "sent": 2,
        "retrying": 1,
        "waiting": 0,
        "dead": 1,
        "fallback": 0,
        "skipped": 0,
    }
    assert _get(samples, "fhirbridge_sync_queue_depth", target="ehr") == 1 + 23 + 1
    assert _get(samples, "fhirbridge_sync_queue_depth", target="vitals") == 16
    for target in ("ehr", "vitals"):
        oldest = _get(samples, "fhirbridge_sync_oldest_waiting_seconds", target=target)
        assert 3600 <= oldest < 3600 + 60


def test_a_request_whose_exception_escaped_counts_as_500(client: FlaskClient) -> None:
    app = client.application

    @app.after_request
    def broken(response: Response) -> Response:  # runs before the metrics hook
        if request.path == "/healthz":
            raise RuntimeError("broken hook")
        return response

    assert client.get("/healthz").status_code == 500
    samples = _scrape(client)
    health = {"route": "/healthz", "method": "GET"}
    assert _get(samples, "fhirbridge_http_requests_total", **health, status="500") == 1
    assert _get(samples, "fhirbridge_http_request_duration_seconds_count", **health) == 1
    assert (
        "fhirbridge_http_requests_total",
        (("method", "GET"), ("route", "/healthz"), ("status", "200")),
    ) not in samples


def test_output_validation_errors_are_counted_by_the_rule(tmp_path: Path) -> None:
    pack = tmp_path / "pack"
    subprocess.run(["cp", "-r", str(ROOT / "mappings"), str(pack)], check=True)
    rule_file = pack / "rules/vital.Observation.yaml"
    text = rule_file.read_text()
    old = "valueQuantity: {value: $.heartRate,"
    assert text.count(old) == 1
    rule_file.write_text(text.replace(old, 'valueQuantity: {value: "fast",'))
    app = create_app(_settings(tmp_path, mappings_dir=pack))
    try:
        client = app.test_client()
        resp = _post(client, DOC)
        assert resp.status_code == 422
        issues = resp.json["issue"]
        heart_rate = [i for i in issues if "rule 'vital-heart-rate'" in i["diagnostics"]]
        assert len(heart_rate) == len(issues) >= 4  # every heart-rate record, only that rule
        samples = _scrape(client)
        errors = _series(samples, "fhirbridge_mapping_errors_total")
        assert errors[(("rule", "vital-heart-rate"),)] == len(issues)
        assert sum(errors.values()) == len(issues)
        # Every rule of the pack is exposed, at 0 until it fails.
        assert errors[(("rule", "vital-blood-pressure"),)] == 0
        assert _get(samples, "fhirbridge_submissions_total", outcome="rejected") == 1
        assert _get(samples, "fhirbridge_submissions_total", outcome="created") == 0
    finally:
        app.extensions["fhirbridge"].store.close()


def test_error_rules_labels_only_pack_rules() -> None:
    rules = frozenset({"vital-heart-rate"})
    invalid = InputInvalidError("x", [Issue("a", ("patient.birthDate",)), Issue("b")])
    assert error_rules(invalid, rules) == ["input-schema", "input-schema"]
    output = OutputInvalidError(
        "x",
        [
            Issue("rule 'vital-heart-rate' (record $.vitals[0]) produced invalid FHIR: bad"),
            Issue("rule 'not-in-the-pack' (record $.vitals[0]) produced invalid FHIR: bad"),
            Issue("two source records map to one resource with different content"),
        ],
    )
    assert error_rules(output, rules) == ["vital-heart-rate", "unknown", "unknown"]
    assert error_rules(ValueError("not a mapping error"), rules) == []


def test_apps_in_one_process_keep_their_own_counts(client: FlaskClient, tmp_path: Path) -> None:
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other = create_app(_settings(other_dir))
    try:
        assert _post(client, DOC).status_code == 201
        other_samples = _scrape(other.test_client())
        assert _get(other_samples, "fhirbridge_submissions_total", outcome="created") == 0
        assert _get(_scrape(client), "fhirbridge_submissions_total", outcome="created") == 1
    finally:
        other.extensions["fhirbridge"].store.close()


def test_sync_collector_reads_every_state_in_one_query(store: ResourceStore) -> None:  # noqa: F811
    outbox = Outbox(store, [Route("ehr-a"), Route("ehr-b", frozenset({"Observation"}))])
    with store.write() as conn:
        outbox.enqueue_versions(
            conn,
            [("Patient", "p1", 1), ("Observation", "o1", 1), ("Observation", "o2", 1)],
            patient_ref="Patient/p1",
            now=T0,
        )
        outbox.enqueue_versions(
            conn,
            [("Observation", "o3", 1)],
            patient_ref="Patient/p1",
            now=T0 + timedelta(seconds=60),
        )
    claimed = outbox.claim("ehr-a", owner="w", now=T0 + timedelta(seconds=1))
    assert len(claimed) == 3  # o3 is due only at T0 + 60 s
    for key, status in ((("Patient", "p1"), "sent"), (("Observation", "o1"), "dead")):
        assert outbox.record(
            "ehr-a", key, owner="w", version=1, status=status, now=T0 + timedelta(seconds=2)
        )
    collector = SyncCollector(
        store.engine,
        ["ehr-a", "ehr-b", "idle"],
        clock=lambda: (T0 + timedelta(seconds=90)).timestamp(),
    )
    families = {f.name: f for f in collector.collect()}
    states = {
        (s.labels["target"], s.labels["state"]): s.value
        for s in families["fhirbridge_sync_resources"].samples
    }
    assert {k: v for k, v in states.items() if v} == {
        ("ehr-a", "sent"): 1,
        ("ehr-a", "dead"): 1,
        ("ehr-a", "in_flight"): 1,
        ("ehr-a", "queued"): 1,
        ("ehr-b", "queued"): 3,
    }
    assert set(states) == {(t, s) for t in ("ehr-a", "ehr-b", "idle") for s in LEDGER_STATES}
    depth = {s.labels["target"]: s.value for s in families["fhirbridge_sync_queue_depth"].samples}
    assert depth == {"ehr-a": 2, "ehr-b": 3, "idle": 0}
    oldest = {
        s.labels["target"]: s.value
        for s in families["fhirbridge_sync_oldest_waiting_seconds"].samples
    }
    assert oldest == {"ehr-a": 90, "ehr-b": 90, "idle": 0}
    assert [s.value for s in families["fhirbridge_sync_ledger_up"].samples] == [1]


def test_sync_collector_survives_an_unreadable_database(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'missing-dir' / 'db.sqlite'}")
    try:
        families = list(SyncCollector(engine, ["ehr"]).collect())
    finally:
        engine.dispose()
    assert [(f.name, [s.value for s in f.samples]) for f in families] == [
        ("fhirbridge_sync_ledger_up", [0])
    ]


# A second web worker: same database and metrics directory, answers one submission, exits.
_OTHER_WORKER = """
import json, sys
from pathlib import Path
from fhirbridge import create_app
from fhirbridge.settings import Settings

settings = Settings.model_validate_json(sys.argv[1])
app = create_app(settings)
doc = json.loads(Path(sys.argv[2]).read_text())
resp = app.test_client().post("/api/v1/submissions", json=doc)
assert resp.status_code == 201, resp.status_code
app.extensions["fhirbridge"].store.close()
"""


def test_multiprocess_mode_sums_every_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(metrics_dir))
    # prometheus_client was imported (in-memory values) before the variable was set here;
    # create_app switches it to file-backed values: put the original back afterwards.
    monkeypatch.setattr(values, "ValueClass", values.ValueClass)
    settings = _settings(tmp_path)
    subprocess.run(
        [
            sys.executable,
            "-c",
            _OTHER_WORKER,
            settings.model_dump_json(),
            str(ROOT / "mappings/fixtures/medicine-session.in.json"),
        ],
        check=True,
        timeout=300,
        env=os.environ.copy(),
        cwd=ROOT,
    )
    app: Flask | None = None
    try:
        app = create_app(settings)
        client = app.test_client()
        assert _post(client, DOC).status_code == 200  # the other process stored it already
        samples = _scrape(client)
    finally:
        if getattr(values.ValueClass, "_multiprocess", False):
            values.ValueClass.close_all_files()
        if app is not None:
            app.extensions["fhirbridge"].store.close()
    assert _get(samples, "fhirbridge_submissions_total", outcome="created") == 1  # other
    assert _get(samples, "fhirbridge_submissions_total", outcome="unchanged") == 1  # this one
    post = {"route": "/api/v1/submissions", "method": "POST"}
    requests = "fhirbridge_http_requests_total"
    assert _get(samples, requests, **post, status="201") == 1
    assert _get(samples, requests, **post, status="200") == 1
    assert _get(samples, "fhirbridge_http_request_duration_seconds_count", **post) == 2
    # Per-process files, one set per process; the ledger is read from the database.
    counter_files = sorted(p.name for p in metrics_dir.glob("counter_*.db"))
    assert f"counter_{os.getpid()}.db" in counter_files and len(counter_files) == 2
    assert _get(samples, "fhirbridge_sync_resources", target="ehr", state="queued") == 27
