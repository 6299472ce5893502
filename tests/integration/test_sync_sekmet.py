"""Sync end to end against a real FHIR server: deliver, read back, re-sync, change a record."""

from __future__ import annotations

import copy
import json
import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from fhirbridge.ehr.client import EhrClient
from fhirbridge.fhir.validate import OutputValidator
from fhirbridge.mapping.pack import load_pack
from fhirbridge.pipeline import transform
from fhirbridge.store.resources import ResourceStore
from fhirbridge.sync.capabilities import load_profile
from fhirbridge.sync.outbox import Outbox, Route
from fhirbridge.sync.retry import RetryPolicy
from fhirbridge.sync.targets import Target
from fhirbridge.sync.worker import TargetRuntime, Worker
from fhirbridge.validation import SubmissionValidator

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PACK = load_pack(ROOT / "mappings")
DOC = json.loads((ROOT / "mappings/fixtures/medicine-session.in.json").read_text())
VALIDATOR = OutputValidator()


class Service:
    """fhirbridge's store, outbox and worker for one target (what serve/worker wire up)."""

    def __init__(self, tmp_path: Path, base_url: str, profile: str = "generic-r4") -> None:
        self.store = ResourceStore.from_url(f"sqlite:///{tmp_path / 'fb.db'}")
        self.store.create_schema()
        self.target = Target(name="ehr", base_url=base_url, profile=profile)
        self.outbox = Outbox(self.store, [Route("ehr")])
        self.client = EhrClient(base_url, timeout=(2, 5))
        self.worker = Worker(
            self.store,
            self.outbox,
            [TargetRuntime(self.target, load_profile(profile), self.client)],
            owner="test-worker",
            rng=random.Random(7),
            policy=RetryPolicy(base_delay=0.01, max_delay=0.05),
        )

    def submit(self, doc: dict[str, Any]) -> list[dict[str, Any]]:
        now = datetime.now(UTC)
        result = transform(
            doc,
            pack=PACK,
            input_validator=SubmissionValidator(PACK.source_schema, PACK.integrity),
            output_validator=VALIDATOR,
            now=now,
        )
        patient = next(r for r in result.resources if r["resourceType"] == "Patient")
        self.store.save_submission(
            submission_id=result.submission_id,
            source=result.source,
            patient_id="p",
            content_hash=result.content_hash,
            resources=result.resources,
            summary={},
            now=now,
            on_saved=lambda conn, saved: self.outbox.enqueue(
                conn, saved, patient_ref=f"Patient/{patient['id']}", now=now
            ),
        )
        return result.resources

    def drain(self, passes: int = 20) -> int:
        total = 0
        for _ in range(passes):
            handled = self.worker.run_once()
            total += handled
            if not handled:
                break
        return total

    def close(self) -> None:
        self.client.close()
        self.store.close()


@pytest.fixture
def service(tmp_path: Path, fhir_server: Any) -> Any:
    svc = Service(tmp_path, fhir_server.base_url)
    yield svc
    svc.close()


def _strip(resource: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(resource)
    meta = out.get("meta", {})
    for key in ("versionId", "lastUpdated", "source"):
        meta.pop(key, None)
    if not meta:
        out.pop("meta", None)
    return out


def test_deliver_read_back_resync_and_change(service: Service, fhir_server: Any) -> None:
    ours = service.submit(DOC)
    assert service.drain() == 27
    statuses = Counter(d.status for d in service.outbox.deliveries(limit=1000))
    assert statuses == {"sent": 27}
    # every resource is on the server exactly once, with our content and our references
    for rtype, n in Counter(r["resourceType"] for r in ours).items():
        assert fhir_server.count(rtype) == n, rtype
    for resource in ours:
        got = fhir_server.read(resource["resourceType"], resource["id"])
        assert got.status_code == 200
        assert _strip(got.json()) == _strip(resource)
    # syncing again sends nothing new
    service.submit(DOC)
    assert service.drain() == 0
    hr = next(r for r in ours if r["resourceType"] == "Observation")
    assert fhir_server.read("Observation", hr["id"]).json()["meta"]["versionId"] == "1"
    # a changed source record becomes a new version on the server
    changed = copy.deepcopy(DOC)
    changed["vitals"][0]["heartRate"] = 75
    service.submit(changed)
    assert service.drain() == 2  # the Observation and the new import's Provenance
    server_hr = fhir_server.read("Observation", hr["id"]).json()
    assert server_hr["valueQuantity"]["value"] == 75 and server_hr["meta"]["versionId"] == "2"
    assert fhir_server.count("Observation") == 15
    assert fhir_server.count("Provenance") == 2


def _drain_until_settled(service: Service, seconds: float = 15.0) -> None:
    """Run the worker until nothing is queued, retrying or in flight (bounded in time)."""
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        service.worker.run_once()
        open_rows = [
            d
            for d in service.outbox.deliveries(limit=1000)
            if d.status in ("queued", "retrying", "in_flight", "waiting")
        ]
        if not open_rows:
            return
        time.sleep(0.05)
    raise AssertionError(f"not settled: {Counter(d.status for d in open_rows)}")


def _assert_all_once(fhir_server: Any, ours: list[dict[str, Any]]) -> None:
    for rtype, n in Counter(r["resourceType"] for r in ours).items():
        assert fhir_server.count(rtype) == n, rtype


def test_server_down_mid_sync_then_back(service: Service, fhir_server: Any) -> None:
    ours = service.submit(DOC)
    fhir_server.stop()
    service.worker.run_once()
    rows = service.outbox.deliveries(limit=1000)
    assert {d.status for d in rows} == {"retrying"}
    assert all(d.attempts == 1 and d.last_error.startswith("ehr_unavailable") for d in rows)
    fhir_server.start()
    _drain_until_settled(service)
    assert Counter(d.status for d in service.outbox.deliveries(limit=1000)) == {"sent": 27}
    _assert_all_once(fhir_server, ours)


@pytest.fixture
def proxied(tmp_path: Path, fault_proxy: Any) -> Any:
    svc = Service(tmp_path, fault_proxy.base_url)
    yield svc
    svc.close()


def test_429_with_retry_after_is_honoured(
    proxied: Service, fault_proxy: Any, fhir_server: Any
) -> None:
    from tests.integration.fault_proxy import Fault

    ours = proxied.submit(DOC)
    fault_proxy.push(Fault("status", status=429, retry_after="1", match_method="POST"))
    before = datetime.now(UTC)
    proxied.worker.run_once()
    rows = proxied.outbox.deliveries(limit=1000)
    assert {d.status for d in rows} == {"retrying"}
    # never earlier than the server asked, although our own backoff is 10 ms here
    assert min(d.next_attempt_at for d in rows) >= before.replace(microsecond=0) + timedelta(
        seconds=1
    )
    assert "429" in rows[0].last_error
    _drain_until_settled(proxied)
    _assert_all_once(fhir_server, ours)


def test_a_write_that_lands_but_is_never_answered_is_not_duplicated(
    proxied: Service, fault_proxy: Any, fhir_server: Any
) -> None:
    from tests.integration.fault_proxy import Fault

    ours = proxied.submit(DOC)
    fault_proxy.push(Fault("after_upstream_timeout", match_method="POST", seconds=8))
    proxied.worker.run_once()  # the transaction reaches the server; the answer never comes
    rows = proxied.outbox.deliveries(limit=1000)
    assert {d.status for d in rows} == {"retrying"}
    assert rows[0].last_error.startswith("ehr_outcome_unknown")
    _drain_until_settled(proxied)
    _assert_all_once(fhir_server, ours)


def test_a_500_inside_one_batch_entry(tmp_path: Path, fault_proxy: Any, fhir_server: Any) -> None:
    import dataclasses

    from tests.integration.fault_proxy import Fault

    svc = Service(tmp_path, fault_proxy.base_url)
    # the same server, planned as batch-only (as Oracle Health is): one batch per level
    caps = dataclasses.replace(load_profile("generic-r4"), transaction=False)
    svc.worker.runtimes[0].caps = caps
    try:
        ours = svc.submit(DOC)
        fault_proxy.push(
            Fault("batch_entry_status", status=500, entry_index=0, match_method="POST")
        )
        svc.worker.run_once()
        statuses = Counter(d.status for d in svc.outbox.deliveries(limit=1000))
        # a 200 on the Bundle did not mean every entry succeeded
        assert statuses["retrying"] >= 1 and statuses["sent"] >= 1
        _drain_until_settled(svc)
        assert Counter(d.status for d in svc.outbox.deliveries(limit=1000)) == {"sent": 27}
        _assert_all_once(fhir_server, ours)
    finally:
        svc.close()
