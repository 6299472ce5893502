"""Sync throughput to a local sekmet-fhir server: transaction Bundles vs one request per resource.

    .venv/bin/python bench/sync_throughput.py [--submissions 74]

Maps N distinct copies of the medicine-session fixture (27 resources each), queues them, and
times the worker delivering everything, once with the generic-r4 profile (one transaction of
PUTs per patient) and once with the same server planned as single-request-only. Also times a
bare loop that posts the same Bundles / PUTs with requests, the ceiling fhirbridge is compared
with. Prints resources per second. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fhirbridge.ehr.client import EhrClient  # noqa: E402
from fhirbridge.fhir.bundle import transaction_bundle  # noqa: E402
from fhirbridge.fhir.validate import OutputValidator  # noqa: E402
from fhirbridge.mapping.pack import load_pack  # noqa: E402
from fhirbridge.pipeline import transform  # noqa: E402
from fhirbridge.store.resources import ResourceStore  # noqa: E402
from fhirbridge.sync.capabilities import load_profile  # noqa: E402
from fhirbridge.sync.outbox import Outbox, Route  # noqa: E402
from fhirbridge.sync.targets import Target  # noqa: E402
from fhirbridge.sync.worker import TargetRuntime, Worker  # noqa: E402
from fhirbridge.validation import SubmissionValidator  # noqa: E402
from tests.integration.fhir_server import FhirServer  # noqa: E402


def distinct(doc: dict, n: int) -> dict:
    text = json.dumps(doc)
    for prefix in ('"p-', '"s-', '"d-', '"v-', '"ae-', '"a-', '"t-'):
        text = text.replace(prefix, f"{prefix}{n}-")
    return json.loads(text)


def run(mode: str, submissions: int, workdir: Path) -> tuple[int, float, float]:
    server = FhirServer(workdir / f"sekmet-{mode}")
    server.start()
    pack = load_pack(ROOT / "mappings")
    iv, ov = SubmissionValidator(pack.source_schema, pack.integrity), OutputValidator()
    store = ResourceStore.from_url(f"sqlite:///{workdir / f'{mode}.db'}")
    store.create_schema()
    outbox = Outbox(store, [Route("ehr")])
    doc = json.loads((ROOT / "mappings/fixtures/medicine-session.in.json").read_text())
    bundles = []
    for i in range(submissions):
        now = datetime.now(UTC)
        result = transform(
            distinct(doc, i), pack=pack, input_validator=iv, output_validator=ov, now=now
        )
        bundles.append(transaction_bundle(result.resources))
        patient = f"Patient/{result.resources[0]['id']}"
        store.save_submission(
            submission_id=result.submission_id,
            source=result.source,
            patient_id="p",
            content_hash=result.content_hash,
            resources=result.resources,
            summary={},
            now=now,
            on_saved=lambda c, s, p=patient, t=now: outbox.enqueue(c, s, patient_ref=p, now=t),
        )
    caps = load_profile("generic-r4")
    if mode == "single":
        caps = dataclasses.replace(caps, transaction=False, batch=False)
    client = EhrClient(server.base_url)
    worker = Worker(
        store,
        outbox,
        [
            TargetRuntime(
                Target(name="ehr", base_url=server.base_url, profile="generic-r4"), caps, client
            )
        ],
    )
    count = sum(len(b["entry"]) for b in bundles)
    start = time.perf_counter()
    while worker.run_once():
        pass
    ours = time.perf_counter() - start
    # The ceiling: the same writes from a bare requests loop. They land on resources that now
    # exist (updates, not creates): close to, not exactly, the same work for the server.
    session = requests.Session()
    headers = {"Content-Type": "application/fhir+json"}
    start = time.perf_counter()
    for bundle in bundles:
        if mode == "transaction":
            session.post(
                server.base_url, data=json.dumps(bundle), headers=headers, timeout=60
            ).raise_for_status()
        else:
            for entry in bundle["entry"]:
                r = entry["resource"]
                session.put(
                    f"{server.base_url}/{r['resourceType']}/{r['id']}",
                    data=json.dumps(r),
                    headers=headers,
                    timeout=60,
                ).raise_for_status()
    bare = time.perf_counter() - start
    session.close()
    client.close()
    store.close()
    server.close()
    return count, ours, bare


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--submissions", type=int, default=74)  # 74 x 27 = 1,998 resources
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("transaction", "single"):
            count, ours, bare = run(mode, args.submissions, Path(tmp))
            print(
                f"{mode:12s} {count} resources: fhirbridge {count / ours:7.0f}/s  "
                f"bare requests loop {count / bare:7.0f}/s  ratio {bare / ours:.2f}"
            )


if __name__ == "__main__":
    main()
