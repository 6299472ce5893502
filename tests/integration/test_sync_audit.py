"""Sync deliveries leave an audit trail: one AuditEvent per request the worker makes to a real
FHIR server (sekmet), with the target, each resource's ledger status and the request's outcome."""

from __future__ import annotations

import json
import random
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from fhirbridge.ehr.client import EhrClient
from fhirbridge.fhir.validate import OutputValidator
from fhirbridge.mapping.pack import load_pack
from fhirbridge.pipeline import transform
from fhirbridge.store.query import parse_search
from fhirbridge.store.resources import ResourceStore
from fhirbridge.sync.capabilities import load_profile
from fhirbridge.sync.outbox import Outbox, Route
from fhirbridge.sync.retry import RetryPolicy
from fhirbridge.sync.targets import Target
from fhirbridge.sync.worker import TargetRuntime, Worker
from fhirbridge.validation import SubmissionValidator
from tests.integration.fault_proxy import Fault

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DOC: dict[str, Any] = json.loads((ROOT / "mappings/fixtures/medicine-session.in.json").read_text())


def _valid(event: dict[str, Any]) -> None:
    assert OutputValidator().validate(event) == [], event


def _who(event: dict[str, Any]) -> str:
    value: str = event["agent"][0]["who"]["identifier"]["value"]
    return value


def _subtype(event: dict[str, Any]) -> str:
    code: str = event["subtype"][0]["code"]
    return code


def _refs(event: dict[str, Any]) -> list[str]:
    return [e["what"]["reference"] for e in event.get("entity", [])]


def _worker(tmp_path: Path, base_url: str) -> tuple[ResourceStore, Outbox, Worker]:
    store = ResourceStore.from_url(f"sqlite:///{tmp_path / 'sync.db'}")
    store.create_schema()
    outbox = Outbox(store, [Route("ehr")])
    worker = Worker(
        store,
        outbox,
        [
            TargetRuntime(
                Target(name="ehr", base_url=base_url, profile="generic-r4"),
                load_profile("generic-r4"),
                EhrClient(base_url, timeout=(2, 5)),
            )
        ],
        owner="test-worker",
        rng=random.Random(7),
        policy=RetryPolicy(base_delay=0.01, max_delay=0.05),
    )
    pack = load_pack(ROOT / "mappings")
    now = datetime.now(UTC)
    result = transform(
        DOC,
        pack=pack,
        input_validator=SubmissionValidator(pack.source_schema, pack.integrity),
        output_validator=OutputValidator(),
        now=now,
    )
    store.save_submission(
        submission_id=result.submission_id,
        source=result.source,
        patient_id="p",
        content_hash=result.content_hash,
        resources=result.resources,
        summary={},
        now=now,
        on_saved=lambda conn, saved: outbox.enqueue(conn, saved, patient_ref="Patient/p", now=now),
    )
    return store, outbox, worker


def _delivery_events(store: ResourceStore) -> list[dict[str, Any]]:
    query = parse_search("AuditEvent", [("_sort", "date"), ("_count", "500")])
    return store.search("AuditEvent", query).resources


def test_sync_deliveries_are_audited_per_request_with_their_outcome(
    tmp_path: Path, fhir_server: Any, fault_proxy: Any
) -> None:
    store, outbox, worker = _worker(tmp_path, fault_proxy.base_url)
    try:
        # the target fails the first request: a retry later, a serious failure now
        fault_proxy.push(Fault("status", status=500))
        assert worker.run_once() > 0
        [failed] = _delivery_events(store)
        _valid(failed)
        assert (failed["outcome"], _who(failed)) == ("8", "fhirbridge-sync")
        assert failed["agent"][0]["requestor"] is True and "network" not in failed["agent"][0]
        assert {d["valueString"] for e in failed["entity"] for d in e["detail"]} == {
            "ehr",
            "retrying",
        }
        time.sleep(0.1)  # past the retry delay
        for _ in range(20):
            if not worker.run_once():
                break
        events = _delivery_events(store)[1:]
        assert events and all(e["outcome"] == "0" for e in events)
        for event in events:
            _valid(event)
            assert _subtype(event) in ("transaction", "batch", "create", "update", "search-type")
            for entity in event["entity"]:
                assert entity["detail"][0] == {"type": "target", "valueString": "ehr"}
        sent = {d.resource_type + "/" + d.resource_id for d in outbox.deliveries(limit=1000)}
        assert {r.split("/_history/")[0] for e in events for r in _refs(e)} == sent
        assert len(sent) == 27 and all(d.status == "sent" for d in outbox.deliveries(limit=1000))
        # the audit trail itself is never delivered
        assert fhir_server.count("AuditEvent") == 0
        assert not any(d.resource_type == "AuditEvent" for d in outbox.deliveries(limit=1000))
    finally:
        for rt in worker.runtimes:
            rt.client.close()
        store.close()
