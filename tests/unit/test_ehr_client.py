"""EhrClient against a real HTTP server on loopback, programmed per test; PHI-safe summaries."""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
import requests
from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

from fhirbridge.ehr.client import (
    EhrClient,
    Location,
    entry_results,
    parse_etag,
    parse_location,
)
from fhirbridge.ehr.errors import (
    MAX_ISSUES,
    ConflictError,
    EhrError,
    InvalidResponseError,
    OutcomeUnknownError,
    RejectedError,
    SearchLimitError,
    TransientError,
    summarize_outcome,
)

NOW = datetime(2025, 3, 4, 12, 0, 0, tzinfo=UTC)
SENTINEL = "SENTINEL-Jane-Doe-1962-07-14"
FHIR_JSON = "application/fhir+json"

Handler = Callable[[Request], Response]


@dataclass
class Seen:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


class _QuietHandler(WSGIRequestHandler):
    protocol_version = "HTTP/1.1"

    def log(self, type: str, message: str, *args: Any) -> None:
        pass


class FakeEhr:
    """A werkzeug server on 127.0.0.1:<free port>; each test maps (method, path) to a handler."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Handler] = {}
        self.seen: list[Seen] = []
        self.release = threading.Event()  # ends any handler that is holding a request
        self.server = make_server(
            "127.0.0.1", 0, self, threaded=True, request_handler=_QuietHandler
        )
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.01}
        )
        self.origin = f"http://127.0.0.1:{self.server.server_port}"
        self.base_url = f"{self.origin}/fhir"

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        request = Request(environ)
        self.seen.append(
            Seen(
                request.method,
                request.path,
                request.query_string.decode(),
                dict(request.headers),
                request.get_data(),
            )
        )
        handler = self.routes.get((request.method, request.path))
        response = handler(request) if handler else fhir(404, outcome("not-found"))
        return response(environ, start_response)

    def on(self, method: str, path: str, handler: Handler) -> None:
        self.routes[(method, "/fhir/" + path.lstrip("/"))] = handler

    def reply(self, method: str, path: str, response: Response) -> None:
        self.on(method, path, lambda _request: response)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()  # joins the request threads
        self.thread.join(timeout=5)


def fhir(status: int, body: dict[str, Any] | None = None, /, **headers: str) -> Response:
    data = json.dumps(body) if body is not None else ""
    return Response(data, status=status, content_type=FHIR_JSON, headers=headers)


def outcome(code: str = "invalid", **issue: Any) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, **issue}],
    }


PHI_OUTCOME = {
    "resourceType": "OperationOutcome",
    "text": {"status": "generated", "div": f"<div>{SENTINEL}</div>"},
    "issue": [
        {
            "severity": "error",
            "code": "invalid",
            "details": {
                "coding": [
                    {
                        "system": "http://example.org/msg",
                        "code": "BIRTHDATE_FUTURE",
                        "display": SENTINEL,
                    },
                    {"system": "http://example.org/msg", "code": f"has space {SENTINEL}"},
                ],
                "text": f"birthDate of {SENTINEL} is in the future",
            },
            "diagnostics": f"Patient {SENTINEL} has an invalid birthDate",
            "expression": ["Patient.birthDate", f"Patient.name.where(given='{SENTINEL}')"],
            "location": ["Patient.birthDate", f"/f:Patient[name='{SENTINEL}']"],
            "extension": [{"url": "http://example.org/x", "valueString": SENTINEL}],
        },
        {"severity": SENTINEL, "code": SENTINEL, "diagnostics": SENTINEL},
    ],
}


@pytest.fixture
def ehr() -> Iterator[FakeEhr]:
    fake = FakeEhr()
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def client(ehr: FakeEhr) -> Iterator[EhrClient]:
    with EhrClient(ehr.base_url, timeout=(1, 0.3), clock=lambda: NOW) as c:
        yield c


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/fhir"


PATIENT = {"resourceType": "Patient", "id": "p1", "gender": "female"}


# --- success paths -----------------------------------------------------------------------------


def test_create_returns_location_etag_and_sends_fhir_json(ehr: FakeEhr, client: EhrClient) -> None:
    ehr.reply(
        "POST",
        "Patient",
        fhir(201, Location=f"{ehr.base_url}/Patient/p1/_history/1", ETag='W/"1"'),
    )
    resp = client.create(PATIENT, if_none_exist="identifier=urn:x|1")
    assert resp.status == 201
    assert resp.body is None
    assert resp.location == Location("Patient", "p1", "1")
    assert (resp.etag, resp.version_id) == ('W/"1"', "1")
    (seen,) = ehr.seen
    assert seen.headers["Content-Type"] == "application/fhir+json; charset=utf-8"
    assert seen.headers["Accept"] == FHIR_JSON
    assert seen.headers["If-None-Exist"] == "identifier=urn:x|1"
    assert seen.headers["Prefer"] == "return=minimal"
    assert json.loads(seen.body) == PATIENT


@pytest.mark.parametrize(("if_match", "sent"), [("3", 'W/"3"'), ('W/"3"', 'W/"3"'), (None, None)])
def test_put_sends_if_match_and_reads_meta_version(
    ehr: FakeEhr, client: EhrClient, if_match: str | None, sent: str | None
) -> None:
    ehr.reply("PUT", "Patient/p1", fhir(200, {**PATIENT, "meta": {"versionId": "4"}}))
    resp = client.put(PATIENT, if_match)
    assert (resp.status, resp.etag, resp.version_id) == (200, None, "4")
    assert ehr.seen[0].headers.get("If-Match") == sent


def test_read_and_capabilities(ehr: FakeEhr, client: EhrClient) -> None:
    ehr.reply("GET", "Patient/p1", fhir(200, PATIENT, ETag='W/"2"'))
    ehr.reply("GET", "metadata", fhir(200, {"resourceType": "CapabilityStatement"}))
    resp = client.read("Patient", "p1")
    assert (resp.body, resp.version_id) == (PATIENT, "2")
    assert client.capabilities() == {"resourceType": "CapabilityStatement"}
    assert [s.path for s in ehr.seen] == ["/fhir/Patient/p1", "/fhir/metadata"]
    assert all("Prefer" not in s.headers for s in ehr.seen)  # reads want the resource


def test_read_of_something_else_is_an_invalid_response(ehr: FakeEhr, client: EhrClient) -> None:
    ehr.reply("GET", "Patient/p1", Response("<html>login</html>", content_type="text/html"))
    with pytest.raises(InvalidResponseError):
        client.read("Patient", "p1")


# --- HTTP errors -------------------------------------------------------------------------------


def test_429_carries_retry_after_seconds(ehr: FakeEhr, client: EhrClient) -> None:
    ehr.reply("POST", "Patient", fhir(429, outcome("throttled"), **{"Retry-After": "7"}))
    with pytest.raises(TransientError) as info:
        client.create(PATIENT)
    assert (info.value.status, info.value.retry_after) == (429, 7.0)
    assert str(info.value) == "POST /fhir/Patient: 429 Too Many Requests: error/throttled"


def test_503_carries_retry_after_http_date(ehr: FakeEhr, client: EhrClient) -> None:
    ehr.reply("GET", "Patient/p1", fhir(503, **{"Retry-After": "Tue, 04 Mar 2025 12:02:00 GMT"}))
    with pytest.raises(TransientError) as info:
        client.read("Patient", "p1")
    assert (info.value.status, info.value.retry_after) == (503, 120.0)


@pytest.mark.parametrize("method", ["GET", "POST", "PUT"])
@pytest.mark.parametrize("status", [408, 500, 503])
def test_server_errors_are_transient(
    ehr: FakeEhr, client: EhrClient, method: str, status: int
) -> None:
    ehr.reply(method, "Patient/p1", Response("oops", status=status))
    with pytest.raises(TransientError) as info:
        client.request(method, "Patient/p1", json=PATIENT if method != "GET" else None)
    assert (info.value.status, info.value.retry_after) == (status, None)
    assert len(ehr.seen) == 1  # the session itself never retries


@pytest.mark.parametrize(
    ("method", "status", "error"),
    [
        ("GET", 502, TransientError),
        ("GET", 504, TransientError),
        ("POST", 502, OutcomeUnknownError),  # the gateway may have passed the write on
        ("PUT", 504, OutcomeUnknownError),
        ("POST", 501, RejectedError),  # not implemented does not change by waiting
    ],
)
def test_gateway_errors_on_writes_have_unknown_outcome(
    ehr: FakeEhr, client: EhrClient, method: str, status: int, error: type[EhrError]
) -> None:
    ehr.reply(method, "Patient/p1", Response("", status=status))
    with pytest.raises(error) as info:
        client.request(method, "Patient/p1")
    assert type(info.value) is error
    assert info.value.status == status


@pytest.mark.parametrize("status", [400, 422])
def test_rejection_keeps_a_phi_free_summary(ehr: FakeEhr, client: EhrClient, status: int) -> None:
    ehr.reply("POST", "Patient", fhir(status, PHI_OUTCOME))
    with pytest.raises(RejectedError) as info:
        client.create(PATIENT)
    err = info.value
    assert type(err) is RejectedError
    assert err.status == status
    assert err.summary.to_dict() == {
        "issues": [
            {
                "severity": "error",
                "code": "invalid",
                "coding": ["http://example.org/msg|BIRTHDATE_FUTURE"],
                "expression": ["Patient.birthDate", "Patient.name"],
                "location": ["Patient.birthDate"],
            },
            {"severity": "unknown", "code": "unknown"},
        ],
        "dropped": 0,
    }
    everything = " ".join(
        [str(err), repr(err), repr(err.args), repr(err.summary), json.dumps(err.outcome())]
    )
    assert SENTINEL not in everything
    assert "BIRTHDATE_FUTURE" in str(err)


@pytest.mark.parametrize("status", [409, 412])
def test_version_conflicts(ehr: FakeEhr, client: EhrClient, status: int) -> None:
    ehr.reply("PUT", "Patient/p1", fhir(status, outcome("conflict")))
    with pytest.raises(ConflictError) as info:
        client.put(PATIENT, "1")
    assert info.value.status == status
    assert isinstance(info.value, RejectedError)


def test_not_found_is_rejected(ehr: FakeEhr, client: EhrClient) -> None:
    with pytest.raises(RejectedError) as info:
        client.read("Patient", "nope")
    assert (type(info.value), info.value.status) == (RejectedError, 404)


def test_redirects_are_followed_for_reads_only(ehr: FakeEhr, client: EhrClient) -> None:
    moved = Response(status=307, headers={"Location": f"{ehr.base_url}/Patient/p2"})
    ehr.reply("GET", "Patient/p1", moved)
    ehr.reply("POST", "Patient", moved)
    ehr.reply("GET", "Patient/p2", fhir(200, PATIENT))
    assert client.read("Patient", "p1").body == PATIENT
    with pytest.raises(RejectedError) as info:
        client.create(PATIENT)
    assert info.value.status == 307


# --- transport errors --------------------------------------------------------------------------


def _hold(ehr: FakeEhr) -> Handler:
    def handler(_request: Request) -> Response:
        ehr.release.wait(3)  # bounded; the fixture releases it at teardown
        return fhir(200, PATIENT)

    return handler


@pytest.mark.parametrize(
    ("method", "error"),
    [("GET", TransientError), ("POST", OutcomeUnknownError), ("PUT", OutcomeUnknownError)],
)
def test_read_timeout(ehr: FakeEhr, client: EhrClient, method: str, error: type[EhrError]) -> None:
    ehr.on(method, "Patient/p1", _hold(ehr))
    with pytest.raises(error) as info:
        client.request(method, "Patient/p1", json=PATIENT if method != "GET" else None)
    assert type(info.value) is error
    assert info.value.status is None
    assert isinstance(info.value.__cause__, requests.ReadTimeout)


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_connection_refused_is_transient(method: str) -> None:
    client = EhrClient(closed_port_url(), timeout=(1, 0.3))
    with client, pytest.raises(TransientError) as info:
        client.request(method, "Patient", json=PATIENT if method == "POST" else None)
    assert info.value.status is None
    assert isinstance(info.value.__cause__, requests.ConnectionError)


def test_untrusted_certificate_is_transient_as_nothing_was_sent() -> None:
    server = make_server("127.0.0.1", 0, fhir(201), ssl_context="adhoc")  # self-signed
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01})
    thread.start()
    try:
        client = EhrClient(f"https://127.0.0.1:{server.server_port}/fhir", timeout=(1, 0.5))
        with client, pytest.raises(TransientError) as info:
            client.create(PATIENT)
        assert isinstance(info.value.__cause__, requests.exceptions.SSLError)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _drop(request: Request) -> Response:
    sock: socket.socket = request.environ["werkzeug.socket"]
    sock.shutdown(socket.SHUT_RDWR)  # the request was read; no answer will come
    return Response("")


@pytest.mark.parametrize(
    ("method", "error"), [("GET", TransientError), ("POST", OutcomeUnknownError)]
)
def test_connection_dropped_after_sending(
    ehr: FakeEhr, client: EhrClient, method: str, error: type[EhrError]
) -> None:
    ehr.on(method, "Patient", _drop)
    with pytest.raises(error) as info:
        client.request(method, "Patient", json=PATIENT if method == "POST" else None)
    assert type(info.value) is error


# --- batch and transaction ---------------------------------------------------------------------


def _entry(status: str, **response: Any) -> dict[str, Any]:
    return {"response": {"status": status, **response}}


def test_batch_entries_are_classified_one_by_one(ehr: FakeEhr, client: EhrClient) -> None:
    answer = [
        _entry("201 Created", location="Patient/p1/_history/1", etag='W/"1"'),
        _entry("200 OK", location=f"{ehr.base_url}/Observation/o1/_history/3"),
        _entry("400 Bad Request", outcome=PHI_OUTCOME),
        _entry("409 Conflict"),
        _entry("412 Precondition Failed", outcome=outcome("conflict")),
        _entry("503 Service Unavailable"),
        _entry("404"),
        _entry("304 Not Modified"),
        {"resource": {"resourceType": "Patient", "name": [{"family": SENTINEL}]}},
    ]
    ehr.reply(
        "POST", "", fhir(200, {"resourceType": "Bundle", "type": "batch-response", "entry": answer})
    )
    sent = {"resourceType": "Bundle", "type": "batch", "entry": [{}] * len(answer)}
    results = entry_results(client.batch(sent).body or {})
    assert [(r.index, r.status, r.ok) for r in results] == [
        (0, 201, True),
        (1, 200, True),
        (2, 400, False),
        (3, 409, False),
        (4, 412, False),
        (5, 503, False),
        (6, 404, False),
        (7, 304, True),
        (8, None, False),
    ]
    assert [type(r.error) for r in results] == [
        type(None),
        type(None),
        RejectedError,
        ConflictError,
        ConflictError,
        TransientError,
        RejectedError,
        type(None),
        OutcomeUnknownError,
    ]
    assert results[0].location == Location("Patient", "p1", "1")
    assert (results[0].etag, results[0].version_id) == ('W/"1"', "1")
    assert results[1].location == Location("Observation", "o1", "3")
    rejected = results[2].error
    assert rejected is not None and rejected.summary.issues[0].code == "invalid"
    assert SENTINEL not in repr([r.error for r in results]) + repr([str(r.error) for r in results])


def test_transaction_answer_that_cannot_be_read_has_unknown_outcome(
    ehr: FakeEhr, client: EhrClient
) -> None:
    ehr.reply("POST", "", fhir(200, {"resourceType": "Bundle", "type": "transaction-response"}))
    sent = {"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": PATIENT}]}
    with pytest.raises(OutcomeUnknownError):
        client.transaction(sent)


def test_transaction_posts_to_the_base(ehr: FakeEhr, client: EhrClient) -> None:
    answer = {"resourceType": "Bundle", "type": "transaction-response", "entry": [_entry("201")]}
    ehr.reply("POST", "", fhir(200, answer))
    sent = {"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": PATIENT}]}
    assert entry_results(client.transaction(sent).body or {})[0].ok
    assert ehr.seen[0].path == "/fhir/"
    with pytest.raises(ValueError):
        client.transaction({**sent, "type": "batch"})


# --- search ------------------------------------------------------------------------------------


def _pages(ehr: FakeEhr, count: int, next_origin: str | None = None) -> None:
    def handler(request: Request) -> Response:
        page = int(request.args.get("page", "1"))
        bundle: dict[str, Any] = {
            "resourceType": "Bundle",
            "type": "searchset",
            "link": [{"relation": "self", "url": request.url}],
            "entry": [
                {"resource": {"resourceType": "Patient", "id": f"p{page}"}},
                {"resource": {"resourceType": "Organization"}, "search": {"mode": "include"}},
            ],
        }
        if page < count:
            origin = next_origin or ehr.origin
            bundle["link"].append(
                {"relation": "next", "url": f"{origin}/fhir/Patient?page={page + 1}&token=x"}
            )
        return fhir(200, bundle)

    ehr.on("GET", "Patient", handler)


def test_search_follows_next_links(ehr: FakeEhr, client: EhrClient) -> None:
    _pages(ehr, 3)
    found = client.search("Patient", {"identifier": "urn:x|1", "_count": "1"})
    assert [p["id"] for p in found] == ["p1", "p2", "p3"]
    assert [s.query for s in ehr.seen] == [
        "identifier=urn%3Ax%7C1&_count=1",
        "page=2&token=x",
        "page=3&token=x",
    ]


def test_search_is_bounded(ehr: FakeEhr, client: EhrClient) -> None:
    _pages(ehr, 5)
    with pytest.raises(SearchLimitError):
        client.search("Patient", [("name", "x")], max_pages=2)
    assert len(ehr.seen) == 2


def test_search_does_not_follow_links_to_another_origin(ehr: FakeEhr, client: EhrClient) -> None:
    _pages(ehr, 2, next_origin="http://evil.example")
    with pytest.raises(InvalidResponseError):
        client.search("Patient", {})
    assert len(ehr.seen) == 1


# --- client set-up and logging -----------------------------------------------------------------


def test_debug_log_has_no_query_and_no_body(
    ehr: FakeEhr, client: EhrClient, caplog: pytest.LogCaptureFixture
) -> None:
    ehr.reply("GET", "Patient", fhir(200, {"resourceType": "Bundle", "type": "searchset"}))
    ehr.reply("POST", "Patient", fhir(422, PHI_OUTCOME))
    with caplog.at_level(logging.DEBUG, logger="fhirbridge.ehr.client"):
        client.search("Patient", {"name": SENTINEL})
        with pytest.raises(RejectedError):
            client.create({**PATIENT, "name": [{"family": SENTINEL}]})
    messages = [r.getMessage() for r in caplog.records if r.name == "fhirbridge.ehr.client"]
    assert len(messages) == 2
    assert messages[0].startswith("GET /fhir/Patient 200 in ")
    assert messages[1].startswith("POST /fhir/Patient 422 in ")
    assert messages[0].endswith(" ms")
    assert SENTINEL not in caplog.text


def test_verification_cannot_be_turned_off() -> None:
    with pytest.raises(ValueError):
        EhrClient("https://ehr.example/fhir", verify=False)


def test_pooled_adapter_never_retries(ehr: FakeEhr) -> None:
    with EhrClient(ehr.base_url, pool_maxsize=4) as client:
        adapter = client.session.get_adapter(ehr.base_url)
        assert isinstance(adapter, requests.adapters.HTTPAdapter)
        assert adapter.max_retries.total == 0
        assert adapter._pool_maxsize == 4  # type: ignore[attr-defined]


def test_a_given_session_is_used_but_not_closed(ehr: FakeEhr) -> None:
    ehr.reply("GET", "metadata", fhir(200, {"resourceType": "CapabilityStatement"}))
    with requests.Session() as session:
        session.headers["X-Trace"] = "t1"
        with EhrClient(ehr.base_url, session=session) as client:
            client.capabilities()
        assert ehr.base_url + "/" not in session.adapters  # unmounted on close
        assert ehr.seen[0].headers["X-Trace"] == "t1"


def test_requests_stay_on_the_server_origin(client: EhrClient) -> None:
    with pytest.raises(ValueError):
        client.request("GET", "http://evil.example/fhir/Patient")


# --- pure helpers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Patient/123", Location("Patient", "123", None)),
        ("Patient/123/_history/2", Location("Patient", "123", "2")),
        (
            "https://ehr.example/fhir/Observation/a.b-c/_history/7",
            Location("Observation", "a.b-c", "7"),
        ),
        ("https://ehr.example/fhir/Patient/123?x=y", Location("Patient", "123", None)),
        ("123", None),
        ("patient/123", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_location(value: str | None, expected: Location | None) -> None:
    assert parse_location(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [('W/"3"', "3"), ('"abc"', "abc"), ("3", None), ('W/""', None), (None, None)],
)
def test_parse_etag(value: str | None, expected: str | None) -> None:
    assert parse_etag(value) == expected


def test_summary_keeps_at_most_ten_issues() -> None:
    many = {"resourceType": "OperationOutcome", "issue": [outcome()["issue"][0]] * 14}
    summary = summarize_outcome(many)
    assert (len(summary.issues), summary.dropped) == (MAX_ISSUES, 4)
    assert str(summary).endswith("(+4 more)")


@pytest.mark.parametrize("body", [None, {}, {"resourceType": "Patient"}, [], "x"])
def test_summary_of_something_else_is_empty(body: object) -> None:
    assert not summarize_outcome(body)
