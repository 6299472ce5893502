"""Schemathesis against the served spec: every operation, generated requests, checked answers.

The app under test is the real one (SQLite file, the shipped mapping pack, one delivery target,
API-key authentication on) holding the medicine-session fixture, so the spec's parameter
examples (that fixture's ids) reach stored resources. Every operation gets bounded,
derandomized runs (the same requests every time, no example database):

* valid requests (the spec's examples, then generated ones) with a key that has every scope:
  no 5xx, a documented status, content type and headers, a body that matches its schema;
* schema-violating requests: the same, and each must be refused with a 4xx;
* requests without credentials: 401 (or the console's redirect to its sign-in page) for every
  operation that is not public, anything else for the public ones; those answers conform too.

Rate limiting is off here (hundreds of requests in seconds); 429 is tested where it is built.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import yaml
from flask import Flask
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from fhirbridge import create_app
from fhirbridge.api.access import SCOPES
from fhirbridge.api.docs import spec_resource
from fhirbridge.auth.apikeys import entry, new_key
from fhirbridge.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "mappings/fixtures/medicine-session.in.json"
KEY = new_key()
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
TARGETS = {
    "targets": [{"name": "ehr", "base_url": "http://127.0.0.1:9/fhir", "profile": "generic-r4"}]
}
BOUNDED = settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    database=None,
    # A failure is reported as generated: shrinking it would cost more than the run.
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def _operations(with_input: bool = False) -> list[str]:
    """ "METHOD /path" of the packaged spec's operations (read at collection: no app needed)."""
    spec = yaml.safe_load(spec_resource().read_text("utf-8"))
    return [
        f"{method.upper()} {path}"
        for path, ops in spec["paths"].items()
        for method, op in ops.items()
        if not with_input or op.get("parameters") or op.get("requestBody")
    ]


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flask]:
    tmp = tmp_path_factory.mktemp("schemathesis")
    targets = tmp / "targets.json"
    targets.write_text(json.dumps(TARGETS))
    application = create_app(
        Settings(
            database_url=f"sqlite:///{tmp / 'fhirbridge.db'}",
            mappings_dir=ROOT / "mappings",
            targets=targets,
            db_auto_upgrade=True,
            auth_api_keys=(entry(KEY, "schemathesis", SCOPES),),
            rate_limit="",
            ui_session_secret="schemathesis-console-secret",
        )
    )
    posted = application.test_client().post(
        "/api/v1/submissions",
        data=FIXTURE.read_bytes(),
        content_type="application/json",
        headers={"X-API-Key": KEY},
    )
    assert posted.status_code == 201, posted.get_data(as_text=True)
    yield application
    application.extensions["fhirbridge"].store.close()


@pytest.fixture(scope="module")
def api_schema(app: Flask) -> Any:
    """The spec as the app serves it (the pack's source schema in place of the file $ref)."""
    return schemathesis.openapi.from_wsgi("/openapi.yaml", app)


def _operation(api_schema: Any, label: str) -> Any:
    method, path = label.split(" ", 1)
    return api_schema[path][method]


def _run(strategy: Any, budget: settings, test: Callable[[Any], None]) -> None:
    @budget
    @given(case=strategy)
    def run(case: Any) -> None:
        test(case)

    run()


def _anonymous(case: Any) -> Any:
    """The case without the credentials Schemathesis made up for the security schemes."""
    case.headers = {
        name: value
        for name, value in (case.headers or {}).items()
        if name.lower() not in ("authorization", "x-api-key")
    }
    case.cookies = {}
    return case


def _conforms(case: Any) -> None:
    _anonymous(case).call_and_validate(headers={"X-API-Key": KEY}, checks=CHECKS)


@pytest.mark.parametrize("label", _operations())
def test_every_answer_conforms(api_schema: Any, label: str) -> None:
    operation = _operation(api_schema, label)
    examples = operation.get_strategies_from_examples()
    if examples:  # the spec's own examples: they name the stored fixture's resources
        _run(st.one_of(examples), settings(BOUNDED, max_examples=2 * len(examples)), _conforms)
    _run(operation.as_strategy(), BOUNDED, _conforms)


@pytest.mark.parametrize("label", _operations(with_input=True))
def test_schema_violating_requests_are_refused(api_schema: Any, label: str) -> None:
    def refused(case: Any) -> None:
        _anonymous(case).call_and_validate(
            headers={"X-API-Key": KEY}, checks=[*CHECKS, negative_data_rejection]
        )

    strategy = _operation(api_schema, label).as_strategy(generation_mode=GenerationMode.NEGATIVE)
    _run(strategy, settings(BOUNDED, max_examples=6), refused)


@pytest.mark.parametrize("label", _operations())
def test_without_credentials_only_public_operations_answer(api_schema: Any, label: str) -> None:
    operation = _operation(api_schema, label)
    public = operation.definition.raw["security"] == []

    def anonymous(case: Any) -> None:
        response = _anonymous(case).call_and_validate(checks=CHECKS)
        if public:
            assert response.status_code != 401
        elif response.status_code == 303:  # the console sends a browser to its sign-in page
            assert "303" in operation.definition.raw["responses"]
            headers = {name.lower(): value for name, value in response.headers.items()}
            assert headers["location"][0].endswith("/ui/login")
        else:
            assert response.status_code == 401

    _run(operation.as_strategy(), settings(BOUNDED, max_examples=2), anonymous)
