"""fhirbridge.logs: JSON lines, the request id on every line of a request, one access line each.

What is asserted is the formatted output (what ops would read), captured at the root handler.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, Response
from flask.testing import FlaskClient

from fhirbridge import create_app, logs
from fhirbridge.api.access import public
from fhirbridge.settings import Settings
from tests.logcapture import captured_logs, json_lines

ROOT = Path(__file__).resolve().parents[2]
HEX32 = re.compile(r"[0-9a-f]{32}")
view_log = logging.getLogger("fhirbridge.tests.view")


# ---------------------------------------------------------------- configure


def test_a_json_line_has_time_level_logger_message_and_extras() -> None:
    with captured_logs("DEBUG") as out:
        logging.getLogger("fhirbridge.tests").info(
            "delivered %d resources", 27, extra={"target": "ehr"}
        )
    (line,) = json_lines(out.getvalue())
    assert list(line) == ["time", "level", "logger", "message", "target"]
    assert line["level"] == "INFO" and line["logger"] == "fhirbridge.tests"
    assert line["message"] == "delivered 27 resources" and line["target"] == "ehr"
    when = datetime.fromisoformat(line["time"])
    assert when.utcoffset() == timedelta(0)
    assert "request_id" not in line  # outside a request there is none


def test_configure_twice_keeps_one_handler_and_leaves_others_alone() -> None:
    root = logging.getLogger()
    others = [h for h in root.handlers if not isinstance(h, logs._RootHandler)]
    with captured_logs("INFO") as first:
        with captured_logs("INFO") as second:
            ours = [h for h in root.handlers if isinstance(h, logs._RootHandler)]
            assert len(ours) == 1
            assert [h for h in root.handlers if not isinstance(h, logs._RootHandler)] == others
            logging.getLogger("fhirbridge.tests").warning("once")
        assert first.getvalue() == ""
        assert [line["message"] for line in json_lines(second.getvalue())] == ["once"]


def test_the_level_applies_and_an_unknown_level_is_refused() -> None:
    with captured_logs("WARNING") as out:
        logging.getLogger("fhirbridge.tests").info("not shown")
        logging.getLogger("fhirbridge.tests").warning("shown")
    assert [line["message"] for line in json_lines(out.getvalue())] == ["shown"]
    with pytest.raises(ValueError, match="unknown log level"):
        logs.configure("loud")


@pytest.mark.parametrize("name", sorted(logs.QUIET_LOGGERS))
def test_chatty_third_party_loggers_stay_at_warning_even_at_debug(name: str) -> None:
    child = logging.getLogger(f"{name}.connectionpool")
    with captured_logs("DEBUG") as out:
        child.debug('"GET /fhir/Patient?identifier=urn:mrn|MRN-448812 HTTP/1.1" 200')
        child.info("GET /fhir/Patient?name=Synthetic-Okafor 200")
        child.warning("connection pool is full")
    assert [line["message"] for line in json_lines(out.getvalue())] == ["connection pool is full"]


def test_text_format_for_development() -> None:
    with captured_logs("INFO", "text") as out:
        logging.getLogger("fhirbridge.tests").info("plain")
    (line,) = out.getvalue().splitlines()
    assert re.fullmatch(r"\S+\+00:00 INFO fhirbridge\.tests: plain", line), line


# ---------------------------------------------------------------- request id and access line


@pytest.fixture
def log_out() -> Iterator[Any]:
    with captured_logs("DEBUG") as out:
        yield out


@pytest.fixture
def bare(log_out: Any) -> FlaskClient:
    """A Flask app with only fhirbridge.logs: one view that logs, one that fails."""
    app = Flask(__name__)

    @public
    def item(item_id: str) -> Response:
        view_log.debug("looking up an item")
        return Response("ok")

    app.add_url_rule("/items/<item_id>", view_func=item)
    logs.init_app(app, Settings())
    return app.test_client()


def _lines(out: Any) -> list[dict[str, Any]]:
    return json_lines(out.getvalue())


def _access(out: Any) -> list[dict[str, Any]]:
    return [line for line in _lines(out) if line["logger"] == "fhirbridge.access"]


def test_a_well_formed_request_id_is_kept_and_echoed(bare: FlaskClient, log_out: Any) -> None:
    rid = "lb-7f3a.2026-03-02T09:00:00Z_x"[:128].replace("_", "-")
    resp = bare.get("/items/a", headers={"X-Request-ID": rid})
    assert resp.headers["X-Request-ID"] == rid
    assert {line["request_id"] for line in _lines(log_out)} == {rid}


@pytest.mark.parametrize(
    "sent",
    [
        None,
        "",
        "x" * 129,
        "has space",
        "<script>alert(1)</script>",
        "Synthetic-Okafor,MRN-448812",
        "naïve",
    ],
)
def test_a_missing_or_malformed_request_id_is_replaced(
    bare: FlaskClient, log_out: Any, sent: str | None
) -> None:
    headers = {} if sent is None else {"X-Request-ID": sent}
    resp = bare.get("/items/a", headers=headers)
    rid = resp.headers["X-Request-ID"]
    assert HEX32.fullmatch(rid), rid
    if sent:
        assert sent not in log_out.getvalue()
    assert {line["request_id"] for line in _lines(log_out)} == {rid}


def test_every_request_gets_its_own_id(bare: FlaskClient) -> None:
    ids = {bare.get("/items/a").headers["X-Request-ID"] for _ in range(3)}
    assert len(ids) == 3


def test_every_line_of_a_request_carries_its_id_and_none_after_it(
    bare: FlaskClient, log_out: Any
) -> None:
    rid = bare.get("/items/a").headers["X-Request-ID"]
    logging.getLogger("fhirbridge.tests").info("between requests")
    lines = _lines(log_out)
    assert [(line["logger"], line.get("request_id")) for line in lines] == [
        ("fhirbridge.tests.view", rid),
        ("fhirbridge.access", rid),
        ("fhirbridge.tests", None),
    ]


def test_the_access_line_names_the_route_template_never_the_path_or_query(
    bare: FlaskClient, log_out: Any
) -> None:
    resp = bare.get("/items/MRN-448812?name=Synthetic-Okafor&birthdate=1984-07-19")
    assert resp.status_code == 200
    (line,) = _access(log_out)
    assert line["message"].startswith("GET /items/<item_id> 200 ")
    assert line["method"] == "GET" and line["route"] == "/items/<item_id>"
    assert line["status"] == 200 and line["client_id"] == "unauthenticated-loopback"
    assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
    assert line["request_id"] == resp.headers["X-Request-ID"]
    text = log_out.getvalue()
    for value in ("MRN-448812", "Synthetic-Okafor", "1984-07-19", "birthdate"):
        assert value not in text


def test_an_unrouted_path_is_logged_without_a_route(bare: FlaskClient, log_out: Any) -> None:
    resp = bare.get("/Synthetic-Okafor/MRN-448812")
    assert resp.status_code == 404
    (line,) = _access(log_out)
    assert line["route"] is None and line["status"] == 404
    assert line["request_id"] == resp.headers["X-Request-ID"]
    assert "Okafor" not in log_out.getvalue()


# ---------------------------------------------------------------- the service


@pytest.fixture
def service(tmp_path: Path, log_out: Any) -> Iterator[FlaskClient]:
    key = "fbk_" + "k" * 43
    from fhirbridge.auth.apikeys import entry

    app = create_app(
        Settings(
            database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
            mappings_dir=ROOT / "mappings",
            max_body_bytes=1024,
            db_auto_upgrade=True,
            auth_api_keys=[entry(key, "clinic-a-feed", ["fhir.read", "submissions.write"])],
        )
    )
    client = app.test_client()
    client.environ_base["HTTP_X_API_KEY"] = key
    yield client
    app.extensions["fhirbridge"].store.close()


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "route"),
    [
        ("get", "/fhir/Patient/does-not-exist", None, 404, "/fhir/<rtype>/<rid>"),
        ("get", "/fhir/NoSuchType/x/y/z", None, 404, None),
        ("delete", "/fhir/metadata", None, 405, None),  # no rule matched the method
        ("post", "/api/v1/submissions", b"{" + b" " * 2048 + b"}", 413, "/api/v1/submissions"),
    ],
)
def test_error_answers_carry_the_request_id_and_an_access_line(
    service: FlaskClient,
    log_out: Any,
    method: str,
    path: str,
    body: bytes | None,
    status: int,
    route: str | None,
) -> None:
    headers = {"X-Request-ID": f"err-{status}"}
    resp = getattr(service, method)(
        path, data=body, headers=headers, content_type="application/json"
    )
    assert resp.status_code == status
    assert resp.headers["X-Request-ID"] == f"err-{status}"
    (line,) = _access(log_out)
    assert (line["status"], line["route"], line["request_id"]) == (status, route, f"err-{status}")


def test_the_access_line_names_the_authenticated_client(service: FlaskClient, log_out: Any) -> None:
    assert service.get("/fhir/Patient").status_code == 200
    service.environ_base["HTTP_X_API_KEY"] = "fbk_" + "w" * 43
    refused = service.get("/fhir/Patient", headers={"X-Request-ID": "refused-1"})
    assert refused.status_code == 401 and refused.headers["X-Request-ID"] == "refused-1"
    ok, bad = _access(log_out)
    assert ok["client_id"] == "clinic-a-feed" and ok["status"] == 200
    assert bad["client_id"] == "anonymous" and bad["status"] == 401
    # the refusal's own warning is a line of the same request
    warning = next(line for line in _lines(log_out) if line["logger"] == "fhirbridge.auth.hook")
    assert warning["request_id"] == "refused-1" and warning["level"] == "WARNING"


# ---------------------------------------------------------------- gunicorn


@pytest.fixture
def gunicorn_loggers() -> Iterator[None]:
    names = ("gunicorn.error", "gunicorn.access")
    saved = {
        n: (
            logging.getLogger(n).level,
            logging.getLogger(n).propagate,
            logging.getLogger(n).handlers[:],
        )
        for n in names
    }
    yield
    for n, (level, propagate, handlers) in saved.items():
        logger = logging.getLogger(n)
        logger.setLevel(level)
        logger.propagate = propagate
        logger.handlers[:] = handlers


def test_gunicorn_error_log_goes_through_the_json_handler(gunicorn_loggers: None) -> None:
    from gunicorn.config import Config

    cfg = Config()
    cfg.set("loglevel", "debug")
    cfg.set("accesslog", "-")  # even when someone turns gunicorn's access log on
    with captured_logs("DEBUG") as out:
        glog = logs.GunicornLogger(cfg)
        glog.info("Booting worker with pid: %s", 4242)
        glog.access_log.info('127.0.0.1 "GET /fhir/Patient?name=Synthetic-Okafor HTTP/1.1" 200')
    (line,) = json_lines(out.getvalue())
    assert line["logger"] == "gunicorn.error" and line["level"] == "INFO"
    assert line["message"] == "Booting worker with pid: 4242"
