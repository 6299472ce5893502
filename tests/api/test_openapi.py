"""The API contract: openapi.yaml against the app's routes, scopes and errors; how it is served.

The spec must list exactly the app's routes and methods; each operation names the scope its
view declares (`@requires`) or `security: []` for a `@public` view, and documents the errors
every such route can answer as OperationOutcome responses. On disk the spec reuses the pack's
source JSON Schema by a relative $ref; served, it is self-contained and carries the source
schema of the pack the app loaded.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import jsonschema
import pytest
import yaml
from flask import Flask
from flask.testing import FlaskClient
from referencing import Registry, Resource
from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR

from fhirbridge import create_app
from fhirbridge.api import docs
from fhirbridge.api.access import SCOPES, access_of
from fhirbridge.mapping.pack import load_pack
from fhirbridge.settings import Settings
from fhirbridge.store.search_params import SUPPORTED_TYPES

ROOT = Path(__file__).resolve().parents[2]
SPEC_PATH = ROOT / "openapi.yaml"
SPEC: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text())
FIXTURE: dict[str, Any] = json.loads(
    (ROOT / "mappings/fixtures/medicine-session.in.json").read_text()
)
METHODS = frozenset({"get", "put", "post", "delete", "patch", "head", "options", "trace"})
# Flask's own static route (no view of ours; the auth hook refuses it like any undeclared one).
FLASK_STATIC = "static"
# The probes are never rate-limited (fhirbridge/api/ratelimit.py).
NOT_RATE_LIMITED = frozenset({("/healthz", "get"), ("/readyz", "get")})
# Answers with a 4xx/5xx status that are not errors: a probe saying "not ready".
NOT_AN_ERROR = frozenset({("/readyz", "get", "503")})


def _app(tmp_path: Path, mappings: Path = ROOT / "mappings") -> Flask:
    return create_app(
        Settings(
            database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
            mappings_dir=mappings,
            db_auto_upgrade=True,
            ui_session_secret="openapi-test-console-secret",
        )
    )


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flask]:
    application = _app(tmp_path_factory.mktemp("openapi"))
    yield application
    application.extensions["fhirbridge"].store.close()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def _template(path: str) -> str:
    """A path with its parameter names blanked: /fhir/<rtype>/<rid> and /fhir/{type}/{id} agree."""
    return re.sub(r"<[^>]+>|\{[^}]+\}", "{}", path)


def _routes(app: Flask) -> dict[tuple[str, str], Any]:
    """(path template, method) → view function, for every route of the app."""
    routes = {}
    for rule in app.url_map.iter_rules():
        if rule.endpoint == FLASK_STATIC:
            continue
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
            routes[(_template(rule.rule), method.lower())] = app.view_functions[rule.endpoint]
    return routes


def _operations(spec: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield path, method, operation


def _resolve(spec: dict[str, Any], node: Any) -> Any:
    """Follow a local $ref (#/a/b) to what it names; anything else is returned as is."""
    while isinstance(node, dict) and isinstance(node.get("$ref"), str):
        ref = node["$ref"]
        assert ref.startswith("#/"), ref
        node = spec
        for part in ref[2:].split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


# ---------------------------------------------------------------- the spec against the routes


def test_routes_and_operations_are_the_same_set(app: Flask) -> None:
    documented = {(_template(path), method) for path, method, _ in _operations(SPEC)}
    routes = set(_routes(app))
    assert routes - documented == set(), "routes missing from openapi.yaml"
    assert documented - routes == set(), "operations in openapi.yaml that no route serves"


def test_each_operation_needs_the_scope_its_view_declares(app: Flask) -> None:
    documented = {(_template(p), m): op for p, m, op in _operations(SPEC)}
    schemes = SPEC["components"]["securitySchemes"]
    for key, view in _routes(app).items():
        access = access_of(view)
        assert access is not None, f"{key}: the view declares neither @requires nor @public"
        operation = documented[key]
        assert "security" in operation, f"{key}: no security"
        if access.scope is None:
            assert operation["security"] == [], f"{key} is @public: security must be []"
            continue
        assert operation["security"], f"{key} needs {access.scope}: security must name it"
        for requirement in operation["security"]:
            for scheme, scopes in requirement.items():
                assert scheme in schemes, f"{key}: unknown security scheme {scheme}"
                assert scopes == [access.scope], f"{key}: {scheme} must require {access.scope}"
        assert operation.get("x-fhirbridge-scope-by-type", {}) == dict(access.by_type), key


def test_every_error_each_operation_can_answer_is_documented(app: Flask) -> None:
    views = _routes(app)
    for path, method, operation in _operations(SPEC):
        where = f"{method.upper()} {path}"
        responses = operation["responses"]
        access = access_of(views[(_template(path), method)])
        assert "500" in responses, f"{where}: no 500"
        if (path, method) not in NOT_RATE_LIMITED:
            assert "429" in responses, f"{where}: no 429 (rate limit)"
        if access is not None and access.scope is not None:
            assert {"401", "403"} <= set(responses), f"{where}: no 401/403"
        if operation.get("requestBody") and "json" in str(operation["requestBody"]):
            assert {"400", "413", "415"} <= set(responses), f"{where}: body errors"
        if any(p.get("in", _resolve(SPEC, p).get("in")) == "path" for p in _parameters(operation)):
            assert "404" in responses or "303" in responses, f"{where}: no 404"


def _parameters(operation: dict[str, Any]) -> list[dict[str, Any]]:
    return [_resolve(SPEC, p) for p in operation.get("parameters", [])]


def test_every_error_is_an_operation_outcome() -> None:
    """Each 4xx/5xx answer offers the FHIR OperationOutcome (the console's HTML forms aside)."""
    outcome = {"$ref": "#/components/schemas/OperationOutcome"}
    for path, method, operation in _operations(SPEC):
        for status, response in operation["responses"].items():
            if not status.isdigit() or int(status) < 400:
                continue
            content = _resolve(SPEC, response).get("content", {})
            if path.startswith("/ui/") and set(content) == {"text/html"}:
                continue  # the console answers a browser's form with the form again
            if (path, method, status) in NOT_AN_ERROR:
                continue
            where = f"{method.upper()} {path} {status}"
            assert content.get("application/fhir+json", {}).get("schema") == outcome, where


def test_error_responses_are_defined_once_and_referenced() -> None:
    responses = SPEC["components"]["responses"]
    for name in ("BadRequest", "Unauthorized", "Forbidden", "NotFound", "NotAcceptable", "Gone"):
        assert name in responses
    for path, method, operation in _operations(SPEC):
        for status in ("401", "403", "429", "500"):
            if status in operation["responses"] and not path.startswith("/ui"):
                assert "$ref" in operation["responses"][status], f"{method} {path} {status}"


def test_security_schemes_and_scopes() -> None:
    schemes = SPEC["components"]["securitySchemes"]
    assert schemes["apiKey"] == {**schemes["apiKey"], "type": "apiKey", "in": "header"}
    assert schemes["apiKey"]["name"] == "X-API-Key"
    assert schemes["bearer"]["type"] == "http" and schemes["bearer"]["scheme"] == "bearer"
    used = {
        scope
        for _, _, operation in _operations(SPEC)
        for requirement in operation["security"]
        for scopes in requirement.values()
        for scope in scopes
    }
    assert used == set(SCOPES)


def test_the_type_parameter_lists_exactly_the_stored_types() -> None:
    assert set(SPEC["components"]["parameters"]["Type"]["schema"]["enum"]) == set(SUPPORTED_TYPES)


def test_the_spec_is_valid_openapi_31(client: FlaskClient) -> None:
    OPENAPI_31_VALIDATOR.validate(SPEC)
    OPENAPI_31_VALIDATOR.validate(yaml.safe_load(client.get("/openapi.yaml").data))


def test_operation_ids_are_unique() -> None:
    ids = [operation["operationId"] for _, _, operation in _operations(SPEC)]
    assert len(ids) == len(set(ids))


# ---------------------------------------------------------------- the file and the package


def test_the_published_spec_is_a_symlink_to_the_packaged_one() -> None:
    assert SPEC_PATH.is_symlink(), "openapi.yaml must stay a symlink: edit fhirbridge/openapi.yaml"
    assert os.readlink(SPEC_PATH) == "fhirbridge/openapi.yaml"  # relative: git stores it
    assert docs.spec_resource().read_bytes() == SPEC_PATH.read_bytes()


def _load_file(uri: str) -> Resource[Any]:
    path = Path(unquote(urlparse(uri).path))
    return Resource.from_contents(yaml.safe_load(path.read_text()))


def test_on_disk_the_submission_is_the_packs_source_schema_by_reference() -> None:
    """The relative $ref resolves from the published openapi.yaml to the shipped pack's schema."""
    refs = docs.external_refs(SPEC)
    assert refs == {"mappings/source-v1.schema.json"}
    assert json.loads((ROOT / "mappings/source-v1.schema.json").read_text()) == (
        load_pack(ROOT / "mappings").source_schema
    )
    root = {**SPEC, "$id": SPEC_PATH.as_uri(), "$ref": "#/components/schemas/Submission"}
    validator = jsonschema.Draft202012Validator(root, registry=Registry(retrieve=_load_file))
    validator.validate(FIXTURE)
    broken = copy.deepcopy(FIXTURE)
    broken["patient"]["birthDate"] = 19850101
    assert [list(e.absolute_path) for e in validator.iter_errors(broken)] == [
        ["patient", "birthDate"]
    ]


# ---------------------------------------------------------------- GET /openapi.yaml


def test_the_served_spec_is_self_contained_and_carries_the_loaded_pack(
    app: Flask, client: FlaskClient
) -> None:
    response = client.get("/openapi.yaml")
    assert response.status_code == 200 and response.mimetype == "application/yaml"
    served = yaml.safe_load(response.data)
    assert docs.external_refs(served) == set()
    for node in docs._walk_refs(served):
        assert _resolve(served, node) is not None
    pointer = f"#/components/schemas/{docs.SUBMISSION}"
    pack = app.extensions["fhirbridge"].pack
    assert served["components"]["schemas"][docs.SUBMISSION] == docs.embed_schema(
        pack.source_schema, pointer
    )
    # Everything else is the file as it is.
    expected = copy.deepcopy(SPEC)
    expected["components"]["schemas"][docs.SUBMISSION] = served["components"]["schemas"][
        docs.SUBMISSION
    ]
    expected["servers"] = [{"url": "/", "description": "This service."}]
    assert served == expected

    validator = jsonschema.Draft202012Validator({**served, "$ref": pointer})
    validator.validate(FIXTURE)
    broken = copy.deepcopy(FIXTURE)
    broken["patient"]["birthDate"] = 19850101
    assert [list(e.absolute_path) for e in validator.iter_errors(broken)] == [
        ["patient", "birthDate"]
    ]


def test_the_served_spec_describes_the_pack_this_instance_loaded(tmp_path: Path) -> None:
    redcap = ROOT / "mappings/examples/redcap"
    app = _app(tmp_path, redcap)
    try:
        served = yaml.safe_load(app.test_client().get("/openapi.yaml").data)
    finally:
        app.extensions["fhirbridge"].store.close()
    submission = served["components"]["schemas"][docs.SUBMISSION]
    source = json.loads((redcap / "source.schema.json").read_text())
    assert submission["title"] == source["title"]
    assert submission != SPEC["components"]["schemas"].get(docs.SUBMISSION)


def test_the_served_spec_is_cached_and_conditional(client: FlaskClient) -> None:
    first = client.get("/openapi.yaml")
    etag = first.headers["ETag"]
    again = client.get("/openapi.yaml", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.data == b""


def test_the_served_spec_names_the_mount_point_as_its_server(client: FlaskClient) -> None:
    mounted = client.get("/openapi.yaml", environ_overrides={"SCRIPT_NAME": "/bridge"})
    assert yaml.safe_load(mounted.data)["servers"] == [
        {"url": "/bridge", "description": "This service."}
    ]


def test_embedding_re_roots_references_and_refuses_other_documents() -> None:
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://example.invalid/s.json",
        "properties": {"a": {"$ref": "#/$defs/a"}, "$ref": {"const": {"$ref": "#/data"}}},
        "$defs": {"a": {"type": "string"}},
    }
    embedded = docs.embed_schema(schema, "#/components/schemas/X")
    assert "$id" not in embedded and "$schema" not in embedded
    assert embedded["properties"]["a"] == {"$ref": "#/components/schemas/X/$defs/a"}
    assert embedded["properties"]["$ref"] == {"const": {"$ref": "#/data"}}  # data, untouched
    assert schema["properties"]["a"] == {"$ref": "#/$defs/a"}  # the input is not changed
    with pytest.raises(ValueError, match="another document"):
        docs.embed_schema({"$ref": "other.json#/x"}, "#/components/schemas/X")


# ---------------------------------------------------------------- GET /docs


class _Page:
    """The URLs an HTML page makes the browser load or follow, and its inline code."""

    def __init__(self, html: str) -> None:
        from html.parser import HTMLParser

        self.urls: list[str] = []
        self.inline: list[str] = []
        page = self

        class Parser(HTMLParser):
            tag = ""

            def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
                self.tag = tag
                for name, value in attrs:
                    if name in ("src", "href", "action", "data-spec-url") and value:
                        page.urls.append(value)
                    if name == "style" or name.startswith("on"):
                        page.inline.append(f"{tag} {name}")

            def handle_data(self, data: str) -> None:
                if self.tag in ("script", "style") and data.strip():
                    page.inline.append(data)

        Parser().feed(html)


def test_the_docs_page_loads_only_our_own_paths(client: FlaskClient) -> None:
    response = client.get("/docs")
    assert response.status_code == 200 and response.mimetype == "text/html"
    html = response.get_data(as_text=True)
    page = _Page(html)
    assert page.inline == []  # nothing inline: the CSP allows none
    assert "://" not in html
    assert page.urls, "the page names its assets"
    for url in page.urls:
        assert url.startswith("/") and not url.startswith("//"), url
        loaded = client.get(url)
        assert loaded.status_code == 200, url
    assert "/openapi.yaml" in page.urls
    assets = {url.removeprefix("/docs/assets/") for url in page.urls if url.startswith("/docs/")}
    documented = SPEC["paths"]["/docs/assets/{name}"]["get"]["parameters"][0]["schema"]["enum"]
    assert assets == set(documented)


def test_the_docs_start_script_configures_no_outside_url(client: FlaskClient) -> None:
    script = client.get("/docs/assets/fhirbridge-docs.js")
    assert script.status_code == 200 and script.mimetype == "text/javascript"
    text = script.get_data(as_text=True)
    assert "://" not in text and "//" not in text.replace('"use strict"', "")
    assert re.search(r"\burl: root\.getAttribute\(\"data-spec-url\"\)", text)
    assert "validatorUrl: null" in text  # the default would call validator.swagger.io


def test_the_docs_page_has_a_strict_content_security_policy(client: FlaskClient) -> None:
    policy = client.get("/docs").headers["Content-Security-Policy"]
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'"
    assert directives["style-src"] == "'self'"
    assert directives["connect-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'"
    assert "unsafe" not in policy and "http" not in policy and "*" not in policy


def test_an_unknown_docs_asset_is_a_404_outcome(client: FlaskClient) -> None:
    for name in ("index.html", "swagger-initializer.js", "..%2Fopenapi.yaml"):
        response = client.get(f"/docs/assets/{name}")
        assert response.status_code == 404
        assert response.json is not None and response.json["resourceType"] == "OperationOutcome"
