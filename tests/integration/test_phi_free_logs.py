"""No patient data in any log line: the whole service and a real delivery, logging at DEBUG.

The root logger is configured as in production (``fhirbridge.logs.configure``, JSON lines) but at
DEBUG, writing to a buffer; stderr and stdout are captured too (``capfd``: anything written
around logging, by a library's print or a last-resort handler), and so is what pytest's own
handler saw (``caplog``). Then every route of the API is driven with the realistic fixtures,
including the error paths where values are most tempting to quote, and the sync worker delivers
to a real FHIR server (sekmet) behind a fault proxy: a patient match by MRN (a query string),
a server that rejects a write and echoes the patient in its OperationOutcome, a reset
connection, a dead letter and its replay. Then nothing in any of the captured output may contain
a value of the fixtures that identifies the patient or is free text (see ``PATIENT_DATA``).

Values are searched case-insensitively and accent-insensitively (the search index folds names),
URL-decoded and JSON-decoded too, so a value is found however it was escaped. The scanner
itself is checked: a value deliberately logged, in each of those spellings, is found.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import re
import sys
import time
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote_plus

import pytest
from flask import has_request_context
from flask.testing import FlaskClient

from fhirbridge import create_app, logs
from fhirbridge.settings import Settings
from fhirbridge.store.resources import ResourceStore
from fhirbridge.sync.outbox import Outbox
from fhirbridge.sync.retry import RetryPolicy
from fhirbridge.sync.runtime import build_runtimes, routes
from fhirbridge.sync.targets import load_targets
from fhirbridge.sync.worker import Worker
from tests.integration.fault_proxy import Fault
from tests.integration.sync_support import WorkerProcess, write_targets
from tests.logcapture import captured_logs, json_lines

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
V1_DOC: dict[str, Any] = json.loads(
    (ROOT / "mappings/fixtures/medicine-session.in.json").read_text()
)
REDCAP_DIR = ROOT / "mappings/examples/redcap"
REDCAP_DOC: dict[str, Any] = json.loads(
    (REDCAP_DIR / "fixtures/medicine-session.in.json").read_text()
)
MRN_SYSTEM = "urn:fhirbridge:clinic-a:mrn"


# ---------------------------------------------------------------- what is patient data
#
# Every string leaf of a fixture is classified by its field name; a field in neither table fails
# the test (a new field needs a decision). Collected: what identifies a person (names of the
# patient and of the clinicians, MRN, study-subject id, NPI, birth date) and what a clinician
# typed (location, lot number, reasons, timepoint labels, adverse-event terms and descriptions).
# Not collected, and why:
#   - record ids (p-0001, s-med-1, ...): opaque keys of the source system; logs may name ids;
#   - closed vocabularies of the source schema (enum values such as "female", "medicine", the
#     REDCap codes "1", "2"): the same for every patient, and common words besides;
#   - date-times of the sessions and their events, and the REDCap measurements ("80", "36.7"):
#     neither identifies anyone without the rest, and short numbers would match any timing;
#   - the source's own name (clinic-a) and the REDCap project label.

V1_FIELDS: dict[str, bool] = {
    # patient data: True
    "family": True,
    "given": True,
    "mrn": True,
    "studySubjectId": True,
    "npi": True,
    "birthDate": True,
    "location": True,
    "lotNumber": True,
    "notGivenReason": True,
    "timepoint": True,  # free text in source format v1 ("end of session")
    "term": True,  # a local term, kept as text when it has no code (muscle-tightness)
    "description": True,
    # not patient data: False
    "source": False,
    "id": False,
    "sessionId": False,
    "administeredBy": False,
    "recordedBy": False,
    "rater": False,
    "therapists": False,
    "suspectDoseIds": False,
    "sex": False,
    "role": False,
    "type": False,
    "status": False,
    "kind": False,
    "substance": False,
    "route": False,
    "severity": False,
    "outcome": False,
    "relatedness": False,
    "instrument": False,
    "start": False,
    "end": False,
    "administeredAt": False,
    "takenAt": False,
    "onset": False,
    "date": False,
}

REDCAP_PATIENT_DATA = {
    "dem_mrn",
    "dem_subject_id",
    "dem_last_name",
    "dem_first_name",
    "dem_middle_name",
    "dem_dob",
    "sess_room",
    "dose_lot",
    "dose_not_given_reason",
    "ae_term_other",
    "ae_description",
}
_REDCAP_NOT = re.compile(
    r"(project|site|record_id|redcap_\w+|\w+_complete|\w+_id"  # labels, ids, form state
    r"|dem_sex|sess_status|sess_lead|sess_co|dose_kind|dose_substance|dose_route|dose_given"
    r"|dose_by|vs_timepoint|ae_term|ae_severity|ae_serious|ae_outcome|ae_suspect___\d+"
    r"|ae_related|ae_recorder"  # REDCap choice codes
    r"|\w+_date|\w+_time|sess_tz_offset"  # dates and times of the sessions and events
    r"|dose_mg|vs_hr|vs_sbp|vs_dbp|vs_temp|vs_rr|vs_spo2)"  # measurements
)


def _string_leaves(node: Any, key: str = "") -> Iterator[tuple[str, str]]:
    """(field name, value) of every non-empty string leaf; list items take the list's name."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _string_leaves(v, k)
    elif isinstance(node, list):
        for item in node:
            yield from _string_leaves(item, key)
    elif isinstance(node, str) and node:
        yield key, node


NAME_FIELDS = {"family", "given", "dem_last_name", "dem_first_name", "dem_middle_name"}


def _with_name_parts(key: str, value: str) -> set[str]:
    """The value; for a name also each part of it (Synthetic-Okafor: Synthetic, Okafor), as a
    search for one part (name:contains=Okafor) might be logged."""
    parts = re.split(r"[\s-]+", value) if key in NAME_FIELDS else []
    return {value, *(p for p in parts if len(p) >= 3)}


def v1_patient_data(doc: dict[str, Any]) -> set[str]:
    out: set[str] = set()
    for key, value in _string_leaves(doc):
        assert key in V1_FIELDS, f"field {key!r} of the v1 fixture is not classified"
        if V1_FIELDS[key]:
            out |= _with_name_parts(key, value)
    return out


def redcap_patient_data(doc: dict[str, Any]) -> set[str]:
    out: set[str] = set()
    for key, value in _string_leaves(doc):
        if key in REDCAP_PATIENT_DATA:
            out |= _with_name_parts(key, value)
        else:
            assert _REDCAP_NOT.fullmatch(key), f"REDCap field {key!r} is not classified"
    return out


# ---------------------------------------------------------------- the scanner


def _fold(text: str) -> str:
    """Accents dropped and case folded, as the search index folds names."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def _json_strings(text: str) -> str:
    """The string values of every JSON line of `text` (escapes such as \\u00e9 decoded)."""
    out: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                out.append(str(k))
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
        else:
            out.append(str(node))

    for line in text.splitlines():
        try:
            walk(json.loads(line))
        except json.JSONDecodeError:
            continue
    return "\n".join(out)


class Scanner:
    """Finds any of `values` in text: folded, and also URL-decoded and JSON-decoded.

    Short purely alphabetic values ("Test", "peak", "Jonah") must stand as a word; longer ones
    (and any with digits, spaces or punctuation) are found anywhere.
    """

    def __init__(self, values: Iterable[str]) -> None:
        self.patterns: dict[str, re.Pattern[str]] = {}
        for value in values:
            folded = _fold(value)
            word = len(folded) <= 5 and folded.isalpha()
            body = re.escape(folded)
            self.patterns[value] = re.compile(rf"\b{body}\b" if word else body)

    def find(self, text: str) -> dict[str, list[str]]:
        """value → the folded lines it was found in (empty when clean)."""
        found: dict[str, list[str]] = {}
        for variant in {text, unquote_plus(text), _json_strings(text)}:
            for line in _fold(variant).splitlines():
                for value, pattern in self.patterns.items():
                    if pattern.search(line):
                        found.setdefault(value, []).append(line[:400])
        return found


# ---------------------------------------------------------------- helpers


def _post(client: FlaskClient, path: str, body: Any, **kw: Any) -> Any:
    data = body if isinstance(body, bytes) else json.dumps(body)
    return client.post(path, data=data, content_type="application/json", **kw)


def _invalid_submission() -> tuple[dict[str, Any], set[str]]:
    """The fixture with patient values in the wrong places, and those values."""
    doc = copy.deepcopy(V1_DOC)
    wrong = {
        "sex": "Adaeze Synthetic-Okafor",  # not in the enum
        "birthDate": "19 July 1984, MRN-448812",  # not a date
        "notes": "Adaeze said she slept badly before the session",  # not a field
    }
    doc["patient"].update(wrong)
    doc["doses"][0]["amountMg"] = "eighty mg for Adaeze"  # not a number
    doc["sessions"][0]["therapists"] = ["t-Lindqvist-Maren"]  # an id that does not exist
    doc["adverseEvents"][0]["severity"] = "Brief nausea after the initial dose"
    values = {*wrong.values(), "eighty mg for Adaeze", "19 July 1984"}
    return doc, values


def _bad_resource() -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "name": [{"family": "Synthetic-Okafor", "given": ["Adaeze"]}],
        "gender": "Adaeze",  # not a code
        "birthDate": "1984-07-19T99",  # not a date
        "identifier": [{"system": MRN_SYSTEM, "value": "MRN-448812", "period": "always"}],
        "unknownElement": "Synthetic-Okafor",
    }


class Clock:
    """The worker's clock: real time plus an offset that `_drain` moves past any wait."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


def _drain(worker: Worker, outbox: Outbox, clock: Clock, seconds: float = 30.0) -> Counter[str]:
    """Run passes until nothing is queued, retrying, in flight or waiting (bounded); when a
    pass finds nothing due, the clock jumps past the longest wait (5 minutes)."""
    deadline = time.monotonic() + seconds
    while True:
        if not worker.run_once():
            clock.offset += timedelta(minutes=6)
        rows = outbox.deliveries(limit=1000)
        counts = Counter(d.status for d in rows)
        if not counts.keys() & {"queued", "retrying", "in_flight", "waiting"}:
            return counts
        why = Counter((d.status, d.resource_type, d.last_error) for d in rows)
        assert time.monotonic() < deadline, f"not settled: {why}"


# ---------------------------------------------------------------- the scanner is able to fail


def test_the_scanner_finds_a_deliberately_logged_value() -> None:
    scanner = Scanner(v1_patient_data(V1_DOC))
    with captured_logs("DEBUG") as out:
        log = logging.getLogger("fhirbridge.tests.leak")
        log.debug("matched patient %s", "SYNTHETIC-OKAFOR")  # case changed
        log.debug("GET /fhir/Patient?name=%s", quote("Synthetic-Okafor Adaeze", safe=""))
        log.info("searched", extra={"query": "birthdate=1984-07-19"})  # in an extra field
        log.info("note: %s", "Treatment room 2")
        log.info("given name %s", "Test")  # a short value, standing as a word
    found = scanner.find(out.getvalue())
    assert set(found) == {
        "Synthetic-Okafor",
        "Synthetic",
        "Okafor",
        "Adaeze",
        "1984-07-19",
        "Treatment room 2",
        "Test",
    }
    escaped = '{"message": "patient Synth\\u00e9tic-Okafor"}'  # JSON escape and an accent
    assert set(Scanner(["Synthetic-Okafor"]).find(escaped)) == {"Synthetic-Okafor"}
    # and clean lines stay clean: words that merely contain a short value are not hits
    clean = "tests passed; pytest-of-ci; speaker; 2026-03-02T09:00:00-05:00 Patient/5bbb7d5a"
    assert scanner.find(clean) == {}


def test_the_patient_data_selected_from_the_fixtures() -> None:
    assert v1_patient_data(V1_DOC) == {
        "Synthetic-Okafor",
        "Synthetic",
        "Okafor",
        "Adaeze",
        "Test",
        "Lindqvist",
        "Maren",
        "Abernathy",
        "Jonah",
        "MRN-448812",
        "MAPP-S-017",
        "1234567893",
        "1984-07-19",
        "Treatment room 2",
        "LOT-2026-02A",
        "pre-dose",
        "pre-supplement",
        "peak",
        "end of session",
        "nausea",
        "muscle-tightness",
        "Brief nausea after the initial dose; settled without treatment.",
    }
    assert redcap_patient_data(REDCAP_DOC) == {
        "MRN-448812",
        "MAPP-S-017",
        "Synthetic-Okafor",
        "Synthetic",
        "Okafor",
        "Adaeze",
        "Test",
        "1984-07-19",
        "Treatment room 2",
        "LOT-2026-02A",
        "Brief nausea after the initial dose; settled without treatment.",
    }


# ---------------------------------------------------------------- the whole service


@pytest.fixture
def debug_logs() -> Iterator[Any]:
    """JSON at DEBUG into a buffer; each line says whether a request was being handled."""

    def mark(record: logging.LogRecord) -> bool:
        record.in_request = has_request_context()
        return True

    with captured_logs("DEBUG") as out:
        handler = next(h for h in logging.getLogger().handlers if isinstance(h, logs._RootHandler))
        handler.addFilter(mark)
        yield out


def test_no_patient_data_in_any_log_line_at_debug(
    tmp_path: Path,
    fhir_server: Any,
    fault_proxy: Any,
    debug_logs: Any,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    invalid, injected = _invalid_submission()
    scanner = Scanner(v1_patient_data(V1_DOC) | redcap_patient_data(REDCAP_DOC) | injected)
    targets_path = write_targets(
        tmp_path / "targets.yaml",
        [
            {
                "name": "ehr",
                "base_url": fault_proxy.base_url,
                "profile": "generic-r4",
                "patient_identifier": {"system": MRN_SYSTEM, "source": "mrn"},
            }
        ],
    )
    db_url = f"sqlite:///{tmp_path / 'fb.db'}"
    settings = Settings(
        database_url=db_url,
        mappings_dir=ROOT / "mappings",
        targets=targets_path,
        max_body_bytes=64 * 1024,
        log_level="DEBUG",
        db_auto_upgrade=True,
    )
    app = create_app(settings)
    client = app.test_client()
    request_ids: list[str] = []

    def call(method: str, path: str, status: int, body: Any = None, **kw: Any) -> Any:
        if body is not None:
            resp = _post(client, path, body, **kw)
        else:
            resp = getattr(client, method)(path, **kw)
        assert resp.status_code == status, (method, path, resp.get_data(as_text=True)[:500])
        request_ids.append(resp.headers["X-Request-ID"])
        return resp

    # ---- submissions: created, unchanged, rejected, malformed, too large, transformed
    first = call("post", "/api/v1/submissions", 201, V1_DOC).json
    call("post", "/api/v1/submissions", 200, V1_DOC)
    call("post", "/api/v1/submissions", 422, invalid)
    malformed = b'{"patient": {"name": {"family": "Synthetic-Okafor", "given": ["Adaeze"'
    call("post", "/api/v1/submissions", 400, malformed)
    too_large = json.dumps({**V1_DOC, "pad": "Synthetic-Okafor " * 5000}).encode()
    call("post", "/api/v1/submissions", 413, too_large)
    call("post", "/api/v1/$transform?trace=true", 200, V1_DOC)
    call("get", f"/api/v1/submissions/{first['submissionId']}", 200)

    # ---- FHIR read API: read, vread, history, searches with patient values in the query
    patient_id = next(r["id"] for r in first["resources"] if r["resourceType"] == "Patient")
    call("get", f"/fhir/Patient/{patient_id}", 200)
    call("get", f"/fhir/Patient/{patient_id}/_history/1", 200)
    call("get", f"/fhir/Patient/{patient_id}/_history", 200)
    searches = [
        "name=Synthetic-Okafor",
        "family=synthetic-okafor&given=Adaeze",
        f"identifier={quote(MRN_SYSTEM + '|MRN-448812', safe='')}",
        "identifier=MRN-448812",
        "birthdate=1984-07-19",
        "name:contains=Okafor&birthdate=ge1984-07-19",
    ]
    for query in searches:
        hits = call("get", f"/fhir/Patient?{query}", 200).json
        assert hits["total"] == 1, query
    strict = {"Prefer": "handling=strict"}  # lenient handling ignores a bad parameter
    call("get", "/fhir/Patient?birthdate=Adaeze-1984", 400, headers=strict)
    call("get", "/fhir/Patient?nickname=Adaeze&name=Synthetic-Okafor", 400, headers=strict)
    form = client.post("/fhir/Patient/_search", data={"name": "Synthetic-Okafor"})
    assert form.status_code == 200 and form.json["total"] == 1
    request_ids.append(form.headers["X-Request-ID"])
    call("get", "/fhir/Observation?patient=Patient/" + patient_id + "&code=8867-4", 200)
    call("get", f"/fhir/Patient/{patient_id}/$everything", 200)
    call("get", "/fhir/Patient/Synthetic-Okafor", 404)  # a name as an id
    call("get", "/fhir/Patient/MRN-448812/Adaeze/1984-07-19", 404)  # no route at all
    assert call("post", "/fhir/Patient/$validate", 200, _bad_resource()).json["issue"]
    call("post", "/fhir/$validate", 400, b'{"resourceType": "Patient", "name": "Adaeze')
    conceptmaps = call("get", "/fhir/ConceptMap", 200).json
    call("get", f"/fhir/ConceptMap/{conceptmaps['entry'][0]['resource']['id']}", 200)
    call("get", "/fhir/ConceptMap?name=Synthetic-Okafor", 200)

    # ---- delivery to a real FHIR server: the patient matched by MRN (a query string) after a
    # reset connection; then a changed record whose write the server rejects, echoing the
    # patient's details in its OperationOutcome: a dead letter, listed, replayed, delivered
    store: ResourceStore = app.extensions["fhirbridge"].store
    targets = load_targets(targets_path)
    outbox = Outbox(store, routes(targets))
    clock = Clock()
    worker = Worker(
        store,
        outbox,
        build_runtimes(targets),
        owner="phi-check",
        rng=random.Random(3),
        policy=RetryPolicy(base_delay=0.01, max_delay=0.05, max_attempts=3),
        lease=timedelta(seconds=30),
        clock=clock,
    )
    fault_proxy.push(Fault("reset", match_method="GET", match_path_prefix="Patient"))
    assert _drain(worker, outbox, clock).keys() <= {"sent", "skipped", "fallback"}
    assert ("reset", "GET") in {(kind, method) for kind, method, _ in fault_proxy.faults_applied}
    echo = {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "error",
                "code": "business-rule",
                "diagnostics": "Patient Synthetic-Okafor, Adaeze (MRN-448812, born 1984-07-19) "
                "is locked",
                "expression": ["Patient.name[0].family"],
            }
        ],
    }
    edited = copy.deepcopy(V1_DOC)
    edited["vitals"][0]["heartRate"] = 74
    call("post", "/api/v1/submissions", 201, edited)
    fault_proxy.push(Fault("status", status=422, body=echo, match_method="POST", times=20))
    settled = _drain(worker, outbox, clock)
    assert settled["dead"] > 0, settled
    call("get", "/api/v1/sync/status", 200)
    dead = call("get", "/api/v1/sync/dead-letters", 200).json
    assert dead["total"] == settled["dead"]
    fault_proxy.clear()
    call("post", "/api/v1/sync/dead-letters/ehr/replay", 200)
    assert _drain(worker, outbox, clock).keys() <= {"sent", "skipped", "fallback"}
    for runtime in worker.runtimes:
        runtime.client.close()

    # ---- the same delivery path from `fhirbridge worker --once` (its own process, JSON on
    # stderr): a changed record is queued, and the server is down for the first write
    changed = copy.deepcopy(V1_DOC)
    changed["vitals"][0]["heartRate"] = 75
    call("post", "/api/v1/submissions", 201, changed)
    fault_proxy.push(Fault("status", status=503, match_method="POST"))
    cli_log = tmp_path / "worker.log"
    code = (
        WorkerProcess(
            cli_log,
            {
                "FHIRBRIDGE_DATABASE_URL": db_url,
                "FHIRBRIDGE_TARGETS": str(targets_path),
                "FHIRBRIDGE_LOG_LEVEL": "DEBUG",
                "FHIRBRIDGE_LOG_FORMAT": "json",
                "FHIRBRIDGE_DB_AUTO_UPGRADE": "true",
            },
            once=True,
        )
        .start()
        .wait(60)
    )
    assert code == 0, cli_log.read_text()
    cli_text = cli_log.read_text(encoding="utf-8")
    assert any(line["logger"].startswith("fhirbridge") for line in json_lines(cli_text))

    # ---- the REDCap pack: a clinic on another source format
    redcap = create_app(
        Settings(
            database_url=f"sqlite:///{tmp_path / 'redcap.db'}",
            mappings_dir=REDCAP_DIR,
            log_level="DEBUG",
            db_auto_upgrade=True,
        )
    )
    other = redcap.test_client()
    for path, status in (("/api/v1/submissions", 201), ("/api/v1/$transform?trace=true", 200)):
        resp = _post(other, path, REDCAP_DOC)
        assert resp.status_code == status
        request_ids.append(resp.headers["X-Request-ID"])
    broken = copy.deepcopy(REDCAP_DOC)
    broken["records"][0]["dem_dob"] = "born 19 July 1984, Adaeze"
    assert _post(other, "/api/v1/submissions", broken).status_code == 422
    redcap.extensions["fhirbridge"].store.close()
    store.close()

    # ---- every line is JSON; a line written while a request was handled names that request
    text = debug_logs.getvalue()
    lines = json_lines(text)
    for line in lines:
        in_request = line.pop("in_request")
        assert ("request_id" in line) == in_request, line
    access = [line for line in lines if line["logger"] == "fhirbridge.access"]
    assert [a["request_id"] for a in access][: len(request_ids)] == request_ids
    loggers = Counter(line["logger"] for line in lines)
    assert loggers["fhirbridge.ehr.client"] > 0, loggers  # the worker's DEBUG lines are here
    for quiet in logs.QUIET_LOGGERS:
        assert not any(name.startswith(quiet) for name in loggers), loggers

    # ---- and none of it holds patient data
    captured = capfd.readouterr()
    outputs = {
        "root handler (JSON)": text,
        "stdout": captured.out,
        "stderr": captured.err,
        "pytest's log capture": caplog.text,
        "fhirbridge worker --once": cli_text,
    }
    leaks = {name: found for name, out in outputs.items() if (found := scanner.find(out))}
    assert leaks == {}, json.dumps(leaks, indent=1)[:4000]

    # ---- the capture is live: a value logged now is found in the same outputs
    logging.getLogger("fhirbridge.tests.canary").debug("canary %s", "MRN-448812")
    print("canary Synthetic-Okafor", file=sys.stderr)
    assert set(scanner.find(debug_logs.getvalue())) == {"MRN-448812"}
    assert set(scanner.find(capfd.readouterr().err)) == {"Synthetic-Okafor", "Synthetic", "Okafor"}
