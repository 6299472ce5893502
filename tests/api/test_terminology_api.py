"""GET /fhir/ConceptMap (search, read) on the full app, and unmapped terms in submissions."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from fhirbridge import create_app
from fhirbridge.api import terminology
from fhirbridge.api.fhir import capability_statement
from fhirbridge.errors import MappingConfigError
from fhirbridge.fhir.conceptmap import pack_conceptmaps
from fhirbridge.fhir.validate import OutputValidator
from fhirbridge.mapping.pack import load_pack
from fhirbridge.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOC: dict[str, Any] = json.loads((ROOT / "mappings/fixtures/medicine-session.in.json").read_text())
FHIR_JSON = "application/fhir+json; charset=utf-8"
BASE = "http://localhost/fhir"
SNOMED = "http://snomed.info/sct"
TERMS_URL = "urn:fhirbridge:ConceptMap:adverse-event-terms"


def _app() -> Flask:
    app = create_app(
        Settings(database_url="sqlite://", mappings_dir=ROOT / "mappings", db_auto_upgrade=True)
    )
    if "terminology" not in app.blueprints:  # until create_app registers it
        terminology.init_app(app)
    return app


@pytest.fixture(scope="module")
def app() -> Iterator[Flask]:
    app = _app()
    yield app
    app.extensions["fhirbridge"].store.close()


@pytest.fixture
def client(app: Flask) -> Iterator[FlaskClient]:
    with app.test_client() as test_client:
        yield test_client


MAPS = pack_conceptmaps(load_pack(ROOT / "mappings"))
IDS = [m["id"] for m in MAPS]


def _bundle(response: TestResponse) -> dict[str, Any]:
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.content_type == FHIR_JSON
    body: dict[str, Any] = response.json  # type: ignore[assignment]
    assert body["resourceType"] == "Bundle" and body["type"] == "searchset"
    return body


def _ids(body: dict[str, Any]) -> list[str]:
    return [e["resource"]["id"] for e in body.get("entry", [])]


def _links(body: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {link["relation"]: dict(parse_qsl(urlsplit(link["url"]).query)) for link in body["link"]}


def _outcome(response: TestResponse, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.content_type == FHIR_JSON
    body: dict[str, Any] = response.json  # type: ignore[assignment]
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["code"] == code
    return body


def test_conceptmap_routes_win_over_the_generic_fhir_routes(app: Flask) -> None:
    urls = app.url_map.bind("localhost")
    assert urls.match("/fhir/ConceptMap")[0] == "terminology.search"
    assert urls.match(f"/fhir/ConceptMap/{IDS[0]}")[0] == "terminology.read"
    assert urls.match("/fhir/ConceptMap/_search", method="POST")[0] == "terminology.search_post"
    assert urls.match("/fhir/Patient")[0] == "fhir.search"
    assert urls.match(f"/fhir/Patient/{IDS[0]}")[0] == "fhir.read"


def test_search_all(client: FlaskClient) -> None:
    body = _bundle(client.get("/fhir/ConceptMap"))
    assert body["total"] == len(MAPS) == 10
    assert _ids(body) == IDS
    for entry, expected in zip(body["entry"], MAPS, strict=True):
        assert entry["fullUrl"] == f"{BASE}/ConceptMap/{expected['id']}"
        assert entry["search"] == {"mode": "match"}
        assert entry["resource"] == expected
    assert _links(body)["self"] == {"_count": "50"}
    assert OutputValidator().validate(body) == []


def test_read(client: FlaskClient) -> None:
    terms = next(m for m in MAPS if m["url"] == TERMS_URL)
    response = client.get(f"/fhir/ConceptMap/{terms['id']}")
    assert response.status_code == 200 and response.content_type == FHIR_JSON
    assert response.json == terms
    missing = _outcome(client.get("/fhir/ConceptMap/no-such-map"), 404, "not-found")
    assert missing["issue"][0]["diagnostics"] == "resource not found"
    pretty = client.get(f"/fhir/ConceptMap/{terms['id']}?_pretty=true")
    assert pretty.get_data(as_text=True).startswith('{\n  "resourceType"')


@pytest.mark.parametrize(
    ("query", "tables"),
    [
        (f"url={TERMS_URL}", ["adverse-event-terms"]),
        (f"url={TERMS_URL},urn:fhirbridge:ConceptMap:route", ["adverse-event-terms", "route"]),
        (
            "name=adverse",
            [
                "adverse-event-outcome",
                "adverse-event-seriousness",
                "adverse-event-severity",
                "adverse-event-terms",
            ],
        ),
        ("name=ADVERSEEVENTT", ["adverse-event-terms"]),
        ("name:exact=AdverseEventTerms", ["adverse-event-terms"]),
        ("name:exact=adverseeventterms", []),
        ("name:contains=score", ["instrument-score-code"]),
        (f"target-system={SNOMED}", ["adverse-event-terms", "route", "substance"]),
        (f"target-system={SNOMED}&name=sub", ["substance"]),
        ("source-system=urn:fhirbridge:CodeSystem:route", ["route"]),
        ("name=", [m["url"].rsplit(":", 1)[1] for m in MAPS]),  # empty value: ignored
    ],
)
def test_search_parameters(client: FlaskClient, query: str, tables: list[str]) -> None:
    body = _bundle(client.get(f"/fhir/ConceptMap?{query}"))
    assert [e["resource"]["url"].rsplit(":", 1)[1] for e in body.get("entry", [])] == tables
    assert body["total"] == len(tables)


def test_search_by_id(client: FlaskClient) -> None:
    body = _bundle(client.get(f"/fhir/ConceptMap?_id={IDS[3]},{IDS[1]}"))
    assert _ids(body) == [IDS[1], IDS[3]]


def test_paging(client: FlaskClient) -> None:
    first = _bundle(client.get("/fhir/ConceptMap?_count=4"))
    assert first["total"] == 10 and _ids(first) == IDS[:4]
    links = _links(first)
    assert set(links) == {"self", "first", "next", "last"}
    assert links["next"] == {"_count": "4", "_offset": "4"}
    assert links["last"] == {"_count": "4", "_offset": "8"}
    last = _bundle(client.get("/fhir/ConceptMap?_count=4&_offset=8"))
    assert _ids(last) == IDS[8:]
    assert _links(last)["previous"] == {"_count": "4", "_offset": "4"}
    only_total = _bundle(client.get("/fhir/ConceptMap?_count=0"))
    assert only_total["total"] == 10 and "entry" not in only_total


def test_unknown_parameters(client: FlaskClient) -> None:
    lenient = _bundle(client.get("/fhir/ConceptMap?status=active&name=Route"))
    assert _ids(lenient) == [m["id"] for m in MAPS if m["name"] == "Route"]
    assert _links(lenient)["self"] == {"name": "Route", "_count": "50"}
    strict = client.get("/fhir/ConceptMap?status=active", headers={"Prefer": "handling=strict"})
    body = _outcome(strict, 400, "not-supported")
    assert body["issue"][0]["diagnostics"] == "unknown search parameter 'status' for ConceptMap"


def test_malformed_parameters_are_400_and_never_echoed(client: FlaskClient) -> None:
    below = _outcome(client.get("/fhir/ConceptMap?url:below=urn:x"), 400, "invalid")
    assert "unsupported modifier on search parameter 'url'" in below["issue"][0]["diagnostics"]
    count = client.get("/fhir/ConceptMap?_count=lots-of-secret")
    _outcome(count, 400, "invalid")
    assert "lots-of-secret" not in count.get_data(as_text=True)


def test_content_negotiation(client: FlaskClient) -> None:
    _outcome(
        client.get("/fhir/ConceptMap", headers={"Accept": "application/xml"}), 406, "not-supported"
    )
    _outcome(client.get("/fhir/ConceptMap?_format=xml"), 406, "not-supported")
    _bundle(client.get("/fhir/ConceptMap?_format=json"))
    _bundle(client.get("/fhir/ConceptMap", headers={"Accept": "application/fhir+json"}))


def test_post_search(client: FlaskClient) -> None:
    body = _bundle(client.post("/fhir/ConceptMap/_search", data={"name": "Route"}))
    assert [e["resource"]["name"] for e in body["entry"]] == ["Route"]
    _outcome(client.post("/fhir/ConceptMap/_search", json={"name": "Route"}), 415, "not-supported")


def test_built_once_per_app(app: Flask, client: FlaskClient, monkeypatch: Any) -> None:
    index = app.extensions[terminology.EXTENSION_KEY]
    assert isinstance(index, terminology.ConceptMapIndex)

    def fail(*_: Any) -> None:
        raise AssertionError("ConceptMaps rebuilt during a request")

    monkeypatch.setattr(terminology, "table_to_conceptmap", fail)
    _bundle(client.get("/fhir/ConceptMap"))
    assert client.get(f"/fhir/ConceptMap/{IDS[0]}").status_code == 200
    assert app.extensions[terminology.EXTENSION_KEY] is index


def test_invalid_conceptmap_stops_the_app_naming_the_table(tmp_path: Path) -> None:
    pack_dir = tmp_path / "mappings"
    shutil.copytree(ROOT / "mappings", pack_dir)
    route = pack_dir / "terminology/route.yaml"
    route.write_text(route.read_text().replace("  oral:", '  " oral":'))  # not a FHIR code
    fake = Flask(__name__)
    fake.extensions["fhirbridge"] = SimpleNamespace(
        pack=load_pack(pack_dir), output_validator=OutputValidator()
    )
    with pytest.raises(MappingConfigError) as raised:
        terminology.init_app(fake)
    assert "terminology/route.yaml" in str(raised.value)
    assert "ConceptMap fails FHIR R4 validation" in str(raised.value)


def test_capability_entry_is_valid_r4() -> None:
    entry = terminology.conceptmap_capability()
    assert entry["type"] == "ConceptMap"
    assert [i["code"] for i in entry["interaction"]] == ["read", "search-type"]
    assert [p["name"] for p in entry["searchParam"]] == [
        "_id",
        "url",
        "name",
        "source-system",
        "target-system",
    ]
    statement = capability_statement(BASE)
    # Adding the entry adds no finding. (The shipped R4 schema's FHIRVersion enum ends at 4.0.0,
    # so the statement's fhirVersion 4.0.1 is a finding of its own, with or without the entry.)
    before = OutputValidator().validate(statement)
    statement["rest"][0]["resource"].append(entry)
    assert OutputValidator().validate(statement) == before
    assert all(i.expression == ("CapabilityStatement.fhirVersion",) for i in before)


# ---------------------------------------------------------------- unmapped terms


def test_an_unknown_term_is_counted_kept_as_text_and_never_coded(tmp_path: Path) -> None:
    doc = copy.deepcopy(DOC)
    doc["adverseEvents"][1]["term"] = "jaw-clenching"  # replaces muscle-tightness
    app = create_app(
        Settings(
            database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
            mappings_dir=ROOT / "mappings",
            db_auto_upgrade=True,
        )
    )
    if "terminology" not in app.blueprints:
        terminology.init_app(app)
    try:
        with app.test_client() as client:
            posted = client.post("/api/v1/submissions", json=doc)
            assert posted.status_code == 201, posted.get_data(as_text=True)
            summary = _json(posted)
            assert summary["unmappedTerms"] == [{"table": "adverse-event-terms", "count": 1}]
            unknown = _json(client.get(f"/fhir/AdverseEvent/{_event_id(summary, 1)}"))
            assert unknown["event"] == {"text": "jaw-clenching"}  # the text, no coding at all
            known = _json(client.get(f"/fhir/AdverseEvent/{_event_id(summary, 0)}"))
            assert known["event"]["coding"][0]["code"] == "422587007"
            # and the published ConceptMap has no row for it either
            terms = _json(client.get(f"/fhir/ConceptMap?url={TERMS_URL}"))["entry"][0]["resource"]
            codes = {e["code"] for g in terms["group"] for e in g["element"]}
            assert "nausea" in codes and "jaw-clenching" not in codes
    finally:
        app.extensions["fhirbridge"].store.close()


def _json(response: TestResponse) -> Any:
    assert response.status_code in (200, 201), response.get_data(as_text=True)
    return response.json


def _event_id(summary: dict[str, Any], index: int) -> str:
    """The id of the AdverseEvent made from adverseEvents[index]."""
    record = next(r for r in summary["records"] if r["record"] == f"$.adverseEvents[{index}]")
    [produced] = record["produced"]
    return str(produced["id"])
