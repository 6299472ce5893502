"""The fault proxy itself, in front of the real sekmet server: each fault kind, pass-through."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.integration.fault_proxy import Fault, FaultProxy

pytestmark = pytest.mark.integration

FHIR = {"Accept": "application/fhir+json", "Content-Type": "application/fhir+json"}
T = 5.0  # default client timeout


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as s:
        s.headers.update(FHIR)
        yield s


def patient(value: str, rid: str | None = None) -> dict[str, Any]:
    res: dict[str, Any] = {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:fault-proxy-test", "value": value}],
    }
    if rid:
        res["id"] = rid
    return res


def test_pass_through_preserves_status_headers_and_body(fhir_server, fault_proxy, http):
    assert fault_proxy.base_url.endswith("/fhir")
    assert fault_proxy.base_url != fhir_server.base_url
    rid = str(uuid.uuid4())
    put = http.put(f"{fault_proxy.base_url}/Patient/{rid}", json=patient("p", rid), timeout=T)
    assert put.status_code == 201
    assert put.headers["ETag"] == 'W/"1"'
    assert put.headers["Location"] == f"{fhir_server.base_url}/Patient/{rid}/_history/1"
    assert put.headers["Content-Type"] == "application/fhir+json; charset=utf-8"
    assert put.json()["id"] == rid

    via_proxy = http.get(f"{fault_proxy.base_url}/Patient/{rid}", timeout=T)
    direct = fhir_server.read("Patient", rid)
    assert via_proxy.status_code == direct.status_code == 200
    assert via_proxy.content == direct.content
    for h in ("ETag", "Last-Modified", "Content-Type", "Content-Length"):
        assert via_proxy.headers[h] == direct.headers[h], h

    # errors pass through too, with their OperationOutcome
    missing = http.get(f"{fault_proxy.base_url}/Patient/nope", timeout=T)
    assert missing.status_code == 404
    assert missing.json()["resourceType"] == "OperationOutcome"
    # HEAD keeps the headers without a body
    head = http.head(f"{fault_proxy.base_url}/Patient/{rid}", timeout=T)
    assert head.status_code == 200 and head.content == b""
    # a search with a query string, and the request log (thread-safe copy)
    search = http.get(f"{fault_proxy.base_url}/Patient", params={"_id": rid}, timeout=T)
    assert search.json()["total"] == 1
    assert fault_proxy.requests_seen == [
        ("PUT", f"/fhir/Patient/{rid}"),
        ("GET", f"/fhir/Patient/{rid}"),
        ("GET", "/fhir/Patient/nope"),
        ("HEAD", f"/fhir/Patient/{rid}"),
        ("GET", f"/fhir/Patient?_id={rid}"),
    ]
    assert fault_proxy.faults_applied == []


@pytest.mark.parametrize(
    ("status", "retry_after"), [(429, "2"), (503, "1"), (500, None)], ids=["429", "503", "500"]
)
def test_status_fault_answers_without_forwarding(
    fhir_server, fault_proxy, http, status, retry_after
):
    fault_proxy.push(Fault("status", status=status, retry_after=retry_after))
    r = http.post(f"{fault_proxy.base_url}/Patient", json=patient("s"), timeout=T)
    assert r.status_code == status
    assert r.headers.get("Retry-After") == retry_after
    assert r.headers["Content-Type"].startswith("application/fhir+json")
    oo = r.json()
    assert oo["resourceType"] == "OperationOutcome"
    assert oo["issue"][0]["code"] == ("throttled" if status == 429 else "transient")
    assert fhir_server.count("Patient") == 0  # not forwarded
    # consumed: the retry passes through
    assert http.post(f"{fault_proxy.base_url}/Patient", json=patient("s"), timeout=T).ok
    assert fhir_server.count("Patient") == 1
    assert fault_proxy.faults_applied == [("status", "POST", "/fhir/Patient")]
    assert fault_proxy.pending == []


def test_faults_match_method_and_path_and_are_consumed_in_order(fhir_server, fault_proxy, http):
    body = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "busy"}]}
    fault_proxy.push(Fault("status", match_method="POST", match_path_prefix="Patient", status=503))
    fault_proxy.push(Fault("status", match_path_prefix="/fhir/Patient", status=429, times=2))
    fault_proxy.push(Fault("status", match_method="PUT", status=500, body=body))
    base = fault_proxy.base_url

    assert http.get(f"{base}/metadata", timeout=T).status_code == 200  # matches nothing
    assert http.put(f"{base}/Observation/x", json={}, timeout=T).json() == body  # third fault
    assert http.get(f"{base}/Patient", timeout=T).status_code == 429  # 2nd (1st is POST only)
    assert http.post(f"{base}/Patient", json=patient("o"), timeout=T).status_code == 503
    assert http.post(f"{base}/Patient", json=patient("o"), timeout=T).status_code == 429
    assert http.post(f"{base}/Patient", json=patient("o"), timeout=T).status_code == 201
    assert [k for k, _, _ in fault_proxy.faults_applied] == ["status"] * 4
    assert fault_proxy.pending == []
    assert fhir_server.count("Patient") == 1


def test_hang_makes_the_client_time_out_and_is_not_forwarded(fhir_server, fault_proxy, http):
    fault_proxy.push(Fault("hang", match_method="POST", seconds=30))
    t0 = time.monotonic()
    with pytest.raises(requests.ReadTimeout):
        http.post(f"{fault_proxy.base_url}/Patient", json=patient("h"), timeout=(T, 0.5))
    assert time.monotonic() - t0 < 3
    assert fhir_server.count("Patient") == 0
    # the proxy is still serving (the held connection ends when the client hangs up)
    assert http.post(f"{fault_proxy.base_url}/Patient", json=patient("h"), timeout=T).ok


def test_hang_ends_on_its_own_after_seconds(fault_proxy, http):
    fault_proxy.push(Fault("hang", seconds=0.3))
    t0 = time.monotonic()
    with pytest.raises(requests.ConnectionError):  # closed without an answer
        http.get(f"{fault_proxy.base_url}/metadata", timeout=T)
    assert 0.25 < time.monotonic() - t0 < 3


def test_reset_drops_the_connection_without_forwarding(fhir_server, fault_proxy, http):
    fault_proxy.push(Fault("reset", match_method="POST"))
    with pytest.raises(requests.ConnectionError):
        http.post(f"{fault_proxy.base_url}/Patient", json=patient("r"), timeout=T)
    assert fhir_server.count("Patient") == 0
    assert http.post(f"{fault_proxy.base_url}/Patient", json=patient("r"), timeout=T).ok
    assert fhir_server.count("Patient") == 1


def test_after_upstream_timeout_write_happens_but_answer_never_comes(
    fhir_server, fault_proxy, http
):
    fault_proxy.push(Fault("after_upstream_timeout", match_method="POST", seconds=30))
    with pytest.raises(requests.ReadTimeout):
        http.post(f"{fault_proxy.base_url}/Patient", json=patient("t"), timeout=(T, 1.0))
    found = fhir_server.search("Patient", identifier="urn:fault-proxy-test|t")
    assert len(found) == 1  # the create succeeded upstream


def _batch(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "batch", "entry": list(entries)}


def _post(res: dict[str, Any]) -> dict[str, Any]:
    return {"resource": res, "request": {"method": "POST", "url": res["resourceType"]}}


@pytest.mark.parametrize("outcome_in", ["resource", "response.outcome"])
def test_batch_entry_status_rewrites_one_entry(fhir_server, fault_proxy, http, outcome_in):
    fault_proxy.push(
        Fault("batch_entry_status", match_method="POST", entry_index=1, status=500,
              outcome_in=outcome_in)
    )  # fmt: skip
    bundle = _batch(_post(patient("b0")), _post(patient("b1")), _post(patient("b2")))
    r = http.post(fault_proxy.base_url, json=bundle, timeout=T)
    assert r.status_code == 200
    assert int(r.headers["Content-Length"]) == len(r.content)
    entries = r.json()["entry"]
    assert [e["response"]["status"][:3] for e in entries] == ["201", "500", "201"]
    assert entries[1]["response"]["status"] == "500 Internal Server Error"
    assert "location" not in entries[1]["response"]
    if outcome_in == "resource":
        oo = entries[1]["resource"]
    else:
        assert "resource" not in entries[1]
        oo = entries[1]["response"]["outcome"]
    assert oo["resourceType"] == "OperationOutcome"
    assert entries[0]["resource"]["resourceType"] == "Patient"
    assert fhir_server.count("Patient") == 3  # entry 1 was written all the same


def test_batch_entry_status_out_of_range_leaves_the_answer_alone(fault_proxy, http):
    fault_proxy.push(Fault("batch_entry_status", entry_index=5, status=500))
    r = http.post(fault_proxy.base_url, json=_batch(_post(patient("x"))), timeout=T)
    assert r.status_code == 200
    assert [e["response"]["status"] for e in r.json()["entry"]] == ["201 Created"]


def test_upstream_down_gives_502_then_recovers(fhir_server, fault_proxy, http):
    fhir_server.stop()
    r = http.get(f"{fault_proxy.base_url}/metadata", timeout=T)
    assert r.status_code == 502
    assert r.json()["resourceType"] == "OperationOutcome"
    fhir_server.start()
    assert http.get(f"{fault_proxy.base_url}/metadata", timeout=T).status_code == 200


def test_keep_alive_and_concurrent_clients(fhir_server, fault_proxy):
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            with requests.Session() as s:
                for i in range(5):
                    body = json.dumps(patient(f"c{n}-{i}"))
                    r = s.post(
                        f"{fault_proxy.base_url}/Patient", data=body, headers=FHIR, timeout=T
                    )
                    assert r.status_code == 201, r.text
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert fhir_server.count("Patient") == 20
    assert len(fault_proxy.requests_seen) == 20


def test_close_wakes_held_connections_and_joins_every_thread(fhir_server):
    proxy = FaultProxy(fhir_server.base_url)
    proxy.push(Fault("hang", seconds=30))
    outcome: list[str] = []

    def client() -> None:
        try:
            requests.get(f"{proxy.base_url}/metadata", timeout=20).close()
            outcome.append("answered")
        except requests.RequestException as e:
            outcome.append(type(e).__name__)

    t = threading.Thread(target=client)
    t.start()
    try:
        deadline = time.monotonic() + 5
        while not proxy.faults_applied and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proxy.faults_applied == [("hang", "GET", "/fhir/metadata")]
        t0 = time.monotonic()
        proxy.close()
        assert time.monotonic() - t0 < 3
    finally:
        proxy.close()
        t.join(10)
    assert outcome == ["ConnectionError"]
    assert not [th.name for th in threading.enumerate() if th.name.startswith("fault-proxy")]
    proxy.close()  # idempotent


def test_fault_validation():
    with pytest.raises(ValueError, match="unknown fault kind"):
        Fault("explode")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="times"):
        Fault("status", times=0)
    with pytest.raises(ValueError, match="http://"):
        FaultProxy("https://127.0.0.1:1/fhir")
    assert Fault("status", match_path_prefix="Patient").matches("GET", "/fhir/Patient/1", "/fhir")
    assert not Fault("status", match_path_prefix="Patient").matches("GET", "/fhir/Obs", "/fhir")
    assert not Fault("status", match_method="post").matches("GET", "/fhir", "/fhir")
