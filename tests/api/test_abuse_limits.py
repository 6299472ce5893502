"""Bad and abusive requests: bodies of the wrong type, malformed, too large, too deep, too long;
and target URLs that a request might try to slip in.

Every route that reads a JSON body answers each with an OperationOutcome (415, 400 ``structure``,
413 ``too-long``, 400 ``too-costly``) that names the limit and never quotes the body; the form
body of POST _search is held to the same size limit, chunked or not. Outbound URLs come only
from the targets file: the sync API takes target names, and an unknown one is a 404 that sends
nothing anywhere.
"""

from __future__ import annotations

import io
import json
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from flask.testing import FlaskClient

from fhirbridge import create_app
from fhirbridge.api.body import DEPTH_CEILING, cost_problem
from fhirbridge.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOC: dict[str, Any] = json.loads((ROOT / "mappings/fixtures/medicine-session.in.json").read_text())
SENTINEL = "Sentinel-Patient-Value-9f2c"  # stands for patient data: never in an answer
MAX_BODY = 4096
MAX_DEPTH = 8
MAX_ARRAY = 10

JSON_ROUTES = [
    "/api/v1/submissions",
    "/api/v1/$transform",
    "/fhir/$validate",
    "/fhir/Patient/$validate",
]
SEARCH_ROUTES = ["/fhir/Patient/_search", "/fhir/ConceptMap/_search"]

ClientFactory = Callable[..., FlaskClient]


@pytest.fixture
def make_client(tmp_path: Path) -> Iterator[ClientFactory]:
    apps = []

    def make(**overrides: Any) -> FlaskClient:
        settings: dict[str, Any] = {
            "database_url": f"sqlite:///{tmp_path / f'db{len(apps)}.sqlite'}",
            "mappings_dir": ROOT / "mappings",
            "db_auto_upgrade": True,
            "rate_limit": "",
            "max_body_bytes": MAX_BODY,
            "max_json_depth": MAX_DEPTH,
            "max_array_length": MAX_ARRAY,
        }
        app = create_app(Settings(**{**settings, **overrides}))
        apps.append(app)
        return app.test_client()

    yield make
    for app in apps:
        app.extensions["fhirbridge"].store.close()


@pytest.fixture
def client(make_client: ClientFactory) -> FlaskClient:
    return make_client()


def _issue(resp: Any, status: int, code: str) -> dict[str, Any]:
    """The answer is `status` with one OperationOutcome issue of `code`, and no patient value."""
    assert resp.status_code == status, resp.get_data(as_text=True)[:500]
    assert resp.mimetype == "application/fhir+json"
    assert SENTINEL not in resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["resourceType"] == "OperationOutcome"
    assert [i["code"] for i in body["issue"]] == [code]
    issue: dict[str, Any] = body["issue"][0]
    return issue


def _nested(depth: int) -> Any:
    """A Patient whose name array holds containers `depth` levels deep in all (with the root)."""
    inner: Any = SENTINEL
    for _ in range(depth - 3):  # root object, `name` array and its object are 3 levels
        inner = [inner]
    return {"resourceType": "Patient", "name": [{"family": SENTINEL, "extension": inner}]}


def _chunked(client: FlaskClient, path: str, body: bytes, content_type: str) -> Any:
    """Send `body` with no Content-Length, as a server that terminates chunked input does."""
    return client.post(
        path,
        input_stream=io.BytesIO(body),
        content_type=content_type,
        headers={"Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True},
    )


# ---------------------------------------------------------------- content type and syntax


@pytest.mark.parametrize("path", JSON_ROUTES)
def test_wrong_content_type_is_415(client: FlaskClient, path: str) -> None:
    resp = client.post(path, data=json.dumps(DOC), content_type="text/plain")
    _issue(resp, 415, "not-supported")


@pytest.mark.parametrize("path", JSON_ROUTES)
def test_malformed_json_is_400_with_the_position_only(client: FlaskClient, path: str) -> None:
    body = f'{{"family": "{SENTINEL}", oops}}'
    resp = client.post(path, data=body, content_type="application/json")
    issue = _issue(resp, 400, "structure")
    assert issue["diagnostics"] == f"malformed JSON at line 1, column {body.index('oops') + 1}"


# ---------------------------------------------------------------- size


@pytest.mark.parametrize("path", JSON_ROUTES)
def test_body_over_the_limit_is_413_too_long(client: FlaskClient, path: str) -> None:
    body = json.dumps({"resourceType": "Patient", "id": SENTINEL, "pad": "x" * MAX_BODY})
    resp = client.post(path, data=body, content_type="application/json")
    issue = _issue(resp, 413, "too-long")
    assert str(MAX_BODY) in issue["diagnostics"]


@pytest.mark.parametrize("path", JSON_ROUTES)
def test_chunked_body_over_the_limit_is_413_not_a_truncated_document(
    client: FlaskClient, path: str
) -> None:
    # werkzeug alone hands such a body over cut at the limit, as if it were complete.
    body = json.dumps({"resourceType": "Patient", "id": SENTINEL, "pad": "x" * MAX_BODY})
    resp = _chunked(client, path, body.encode(), "application/json")
    issue = _issue(resp, 413, "too-long")
    assert str(MAX_BODY) in issue["diagnostics"]


@pytest.mark.parametrize("extra", [0, 1])
def test_chunked_body_at_the_limit_is_read_whole(client: FlaskClient, extra: int) -> None:
    """Exactly max_body_bytes is accepted; one byte more is not."""
    body = json.dumps({"resourceType": "Patient", "active": True}).encode()
    padded = body + b" " * (MAX_BODY - len(body) + extra)
    resp = _chunked(client, "/fhir/Patient/$validate", padded, "application/fhir+json")
    if extra:
        _issue(resp, 413, "too-long")
    else:
        assert resp.status_code == 200, resp.get_data(as_text=True)
        assert resp.get_json()["issue"][0]["diagnostics"] == "no issues"


@pytest.mark.parametrize("path", SEARCH_ROUTES)
def test_search_form_over_the_limit_is_413_chunked_or_not(client: FlaskClient, path: str) -> None:
    form = f"_id={SENTINEL}&name={'x' * MAX_BODY}"
    form_type = "application/x-www-form-urlencoded"
    _issue(client.post(path, data=form, content_type=form_type), 413, "too-long")
    _issue(_chunked(client, path, form.encode(), form_type), 413, "too-long")


@pytest.mark.parametrize("path", SEARCH_ROUTES)
def test_search_form_within_the_limit_still_searches(client: FlaskClient, path: str) -> None:
    form_type = "application/x-www-form-urlencoded"
    for resp in (
        client.post(path, data="_id=nothing-has-this-id", content_type=form_type),
        _chunked(client, path, b"_id=nothing-has-this-id", form_type),
    ):
        assert resp.status_code == 200, resp.get_data(as_text=True)
        assert resp.get_json()["total"] == 0


# ---------------------------------------------------------------- depth and array length


@pytest.mark.parametrize("path", JSON_ROUTES)
def test_too_deep_is_400_too_costly_naming_the_limit(client: FlaskClient, path: str) -> None:
    resp = client.post(path, json=_nested(MAX_DEPTH + 1))
    issue = _issue(resp, 400, "too-costly")
    assert issue["diagnostics"] == (
        f"the JSON document is nested deeper than the limit of {MAX_DEPTH} levels"
    )


@pytest.mark.parametrize("path", JSON_ROUTES)
def test_too_long_array_is_400_too_costly_naming_the_limit(client: FlaskClient, path: str) -> None:
    doc = {**DOC, "vitals": [{"note": SENTINEL}] * (MAX_ARRAY + 1)}
    resp = client.post(path, json=doc)
    issue = _issue(resp, 400, "too-costly")
    assert issue["diagnostics"] == f"a JSON array is longer than the limit of {MAX_ARRAY} items"


def test_at_the_limits_the_document_is_processed(client: FlaskClient) -> None:
    resp = client.post("/fhir/Patient/$validate", json=_nested(MAX_DEPTH))
    assert resp.status_code == 200, resp.get_data(as_text=True)  # validated: issues, not a 400
    assert "too-costly" not in resp.get_data(as_text=True)
    full = client.post(
        "/fhir/$validate",
        json={"resourceType": "Patient", "name": [{"given": ["A"] * MAX_ARRAY}]},
    )
    assert full.status_code == 200
    assert full.get_json()["issue"][0]["diagnostics"] == "no issues"


@pytest.mark.parametrize("path", JSON_ROUTES)
def test_deeper_than_orjson_parses_is_the_same_400_not_a_500(
    make_client: ClientFactory, path: str
) -> None:
    client = make_client(max_body_bytes=1024 * 1024, max_json_depth=DEPTH_CEILING)
    body = '{"a":' * 2000 + f'"{SENTINEL}"' + "}" * 2000
    issue = _issue(client.post(path, data=body, content_type="application/json"), 400, "too-costly")
    assert issue["diagnostics"] == (
        f"the JSON document is nested deeper than the limit of {DEPTH_CEILING} levels"
    )


@pytest.mark.parametrize("path", JSON_ROUTES)
def test_the_deepest_document_allowed_is_no_500(make_client: ClientFactory, path: str) -> None:
    """The R4 JSON Schema validator (jsonschema-rs) fails with a ValueError just past 256
    levels: the deepest setting allowed (DEPTH_CEILING) must still answer without a 500."""
    client = make_client(max_body_bytes=1024 * 1024, max_json_depth=DEPTH_CEILING)
    deepest = client.post(path, json=_nested(DEPTH_CEILING))
    assert deepest.status_code < 500, deepest.get_data(as_text=True)[:500]
    assert SENTINEL not in deepest.get_data(as_text=True)
    issue = _issue(client.post(path, json=_nested(DEPTH_CEILING + 1)), 400, "too-costly")
    assert str(DEPTH_CEILING) in issue["diagnostics"]


# ---------------------------------------------------------------- the walk itself (pure)


def test_cost_problem_counts_containers_as_levels() -> None:
    assert cost_problem("scalar", max_depth=1, max_array_length=1) is None
    assert cost_problem([], max_depth=1, max_array_length=0) is None
    assert cost_problem({"a": [1]}, max_depth=2, max_array_length=1) is None
    assert cost_problem({"a": [1]}, max_depth=1, max_array_length=1) == (
        "the JSON document is nested deeper than the limit of 1 levels"
    )
    assert cost_problem({"a": {"b": [1, 2, 3]}}, max_depth=9, max_array_length=2) == (
        "a JSON array is longer than the limit of 2 items"
    )


def test_cost_problem_walks_without_recursion() -> None:
    deep: Any = []
    for _ in range(50_000):  # far beyond Python's recursion limit
        deep = [deep]
    assert cost_problem(deep, max_depth=60_000, max_array_length=1) is None
    assert cost_problem(deep, max_depth=49_999, max_array_length=1) is not None


# ---------------------------------------------------------------- outbound URLs


class _Recorder(BaseHTTPRequestHandler):
    """A FHIR server stand-in that only records what reaches it."""

    seen: list[str]

    def _record(self) -> None:
        self.seen.append(f"{self.command} {self.path}")
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_PUT = do_DELETE = _record

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[tuple[str, list[str]]]:
    """(base URL, requests received) of a real HTTP server on 127.0.0.1."""
    seen: list[str] = []
    handler = type("Recorder", (_Recorder,), {"seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/fhir", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_sync_api_takes_target_names_only_and_unknown_is_404_sending_nothing(
    make_client: ClientFactory, tmp_path: Path, recorder: tuple[str, list[str]]
) -> None:
    base_url, seen = recorder
    targets = tmp_path / "targets.yaml"
    targets.write_text(
        f"targets:\n  - name: ehr\n    base_url: {base_url}\n    profile: generic-r4\n"
    )
    client = make_client(targets=targets, max_body_bytes=1024 * 1024, max_array_length=10_000)
    assert client.post("/api/v1/submissions", json=DOC).status_code == 201
    evil = "http://127.0.0.1:9/steal"  # a URL where a target name belongs
    quoted = urllib.parse.quote(evil, safe="")
    for method, path in [
        ("GET", f"/api/v1/sync/dead-letters?target={quoted}"),
        ("GET", "/api/v1/sync/dead-letters?target=nope"),
        ("GET", "/api/v1/sync/dead-letters/nope/Patient/p1"),
        ("POST", "/api/v1/sync/dead-letters/nope/replay"),
        ("POST", f"/api/v1/sync/dead-letters/{quoted}/replay"),
        ("POST", "/api/v1/sync/dead-letters/nope/Patient/p1/replay"),
        ("POST", f"/api/v1/sync/dead-letters/replay?target={quoted}&base_url={quoted}"),
    ]:
        # (werkzeug answers a path with "//" by a 308 to the path with "/": follow it)
        resp = client.open(path, method=method, follow_redirects=True)
        assert resp.status_code == 404, (method, path, resp.get_data(as_text=True))
        assert resp.get_json()["resourceType"] == "OperationOutcome"
    # the known target answers, and still nothing is sent from a request: only the worker sends
    replayed = client.post("/api/v1/sync/dead-letters/ehr/replay")
    assert replayed.status_code == 200 and replayed.get_json()["replayed"] == 0
    assert seen == []
    outbox = client.application.extensions["fhirbridge"].outbox
    assert set(outbox.summary(datetime.now(UTC))) == {"ehr"}  # nothing queued for another name
    # the recorder does record what reaches it: the empty list above means nothing was sent
    assert requests.get(f"{base_url}/metadata", timeout=5).status_code == 200
    assert seen == ["GET /fhir/metadata"]


def test_a_depth_setting_past_the_ceiling_is_refused_at_start_up() -> None:
    from pydantic import ValidationError

    from fhirbridge.settings import Settings

    with pytest.raises(ValidationError):
        Settings(max_json_depth=DEPTH_CEILING + 1)
