"""Cold start (issue 6): what create_app loads before the first answer, and how serve starts.

A fresh interpreter is the only honest place to look: in the test process every module some
other test imported is already there. A service without sync targets, with API keys (no JWT)
and without a rate limit, on a database at head, must start and answer /readyz without
alembic, the sync client side (requests, PyJWT, cryptography, the planner) or Flask-Limiter;
each of them is loaded as soon as a setting asks for it, so the checks below can fail both ways.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fhirbridge import cli, create_app, db
from fhirbridge.cli import _start_up_objects_frozen, _WorkerHooks
from fhirbridge.fhir.validate import EMITTED_RESOURCE_TYPES, _r4b_model
from fhirbridge.mapping import pack as mapping_pack
from fhirbridge.mapping.pack import check_source_schema, load_pack
from fhirbridge.settings import Settings
from fhirbridge.store.resources import ResourceStore
from fhirbridge.validation import SubmissionValidator

ROOT = Path(__file__).resolve().parents[1]
WATCHED = (
    "alembic",
    "flask_limiter",
    "jwt",
    "cryptography",
    "requests",
    "fhirbridge.sync.planner",
    "fhirbridge.sync.runtime",
)
PROBE = """
import json, sys
from fhirbridge import create_app
status = create_app().test_client().get("/readyz").status_code
watched = {name: name in sys.modules for name in sys.argv[1:]}
print(json.dumps({"readyz": status, "loaded": watched}))
"""


def _start(tmp_path: Path, **settings: str) -> dict[str, object]:
    database_url = f"sqlite:///{tmp_path / 'start.db'}"
    store = ResourceStore.from_url(database_url)
    db.upgrade(store)
    store.close()
    key = {"client_id": "probe", "sha256": hashlib.sha256(b"k").hexdigest(), "scopes": []}
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRBRIDGE_")}
    env |= {
        "FHIRBRIDGE_DATABASE_URL": database_url,
        "FHIRBRIDGE_MAPPINGS_DIR": str(ROOT / "mappings"),
        "FHIRBRIDGE_AUTH_API_KEYS": json.dumps([key]),
        "FHIRBRIDGE_RATE_LIMIT": "",
        **{f"FHIRBRIDGE_{name.upper()}": value for name, value in settings.items()},
    }
    run = subprocess.run(
        [sys.executable, "-c", PROBE, *WATCHED],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result: dict[str, object] = json.loads(run.stdout)
    return result


def test_a_plain_start_loads_none_of_the_optional_parts(tmp_path: Path) -> None:
    assert _start(tmp_path) == {"readyz": 200, "loaded": dict.fromkeys(WATCHED, False)}


def _public_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


@pytest.mark.parametrize(
    ("setting", "loads"),
    [
        ("rate_limit", {"flask_limiter"}),
        ("auth_jwt_public_key", {"jwt", "cryptography"}),
        (
            "targets",
            {
                "requests",
                "jwt",
                "cryptography",
                "fhirbridge.sync.runtime",
                "fhirbridge.sync.planner",
            },
        ),
    ],
)
def test_each_part_is_loaded_when_a_setting_asks_for_it(
    tmp_path: Path, setting: str, loads: set[str]
) -> None:
    targets = tmp_path / "targets.yaml"
    targets.write_text(
        "targets:\n  - name: research\n    base_url: http://127.0.0.1:9/fhir\n"
        "    profile: generic-r4\n"
    )
    settings = {
        "rate_limit": {"rate_limit": "100/second"},
        "auth_jwt_public_key": {"auth_jwt_public_key": _public_pem(), "auth_jwt_audience": "fb"},
        "targets": {"targets": str(targets)},
    }[setting]
    started = _start(tmp_path, **settings)
    assert started["readyz"] == 200
    loaded = started["loaded"]
    assert isinstance(loaded, dict)
    assert {name for name, present in loaded.items() if present} == loads


# ---------------------------------------------------------- serve: the master and its workers


def test_serve_collects_no_garbage_while_building_then_freezes_what_it_built() -> None:
    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    try:
        with _start_up_objects_frozen():
            assert not gc.isenabled()
            built = [{"start-up": i} for i in range(1000)]
        assert gc.isenabled()
        assert gc.get_freeze_count() >= frozen + len(built)
    finally:
        gc.unfreeze()  # the rest of the test session collects as usual


def test_serve_turns_the_collector_back_on_when_start_up_fails() -> None:
    with pytest.raises(SystemExit), _start_up_objects_frozen():
        raise SystemExit(2)
    assert gc.isenabled()


def test_a_forked_worker_opens_its_own_connections_and_warms_up_after_answering(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "WARM_UP_AFTER_SECONDS", 600.0)  # only an answer starts it
    database_url = f"sqlite:///{tmp_path / 'fork.db'}"
    store = ResourceStore.from_url(database_url)
    db.upgrade(store)
    store.close()
    app = create_app(Settings(database_url=database_url, mappings_dir=ROOT / "mappings"))
    services = app.extensions["fhirbridge"]
    masters = services.store.engine.pool
    assert masters.checkedin() == 1  # the migration check's connection, kept by the master
    _r4b_model.cache_clear()  # as in a fresh worker: no model looked up yet
    hooks = _WorkerHooks(app)
    try:
        hooks.post_fork(None, None)
        (warm_up,) = [t for t in threading.enumerate() if t.name == "fhirbridge-warm-up"]
        assert services.store.engine.pool is not masters
        assert services.store.engine.pool.checkedin() == 0
        assert services.store.ping()  # the worker's own connection
        warm_up.join(timeout=0.3)
        assert warm_up.is_alive()  # waiting for the worker's first answer
        hooks.pre_request(None, None)
        hooks.post_request(None, None, {}, None)
        hooks.pre_request(None, None)  # answered once, busy again: still not now
        warm_up.join(timeout=0.5)
        assert warm_up.is_alive()
        assert _r4b_model.cache_info().currsize == 0
        hooks.post_request(None, None, {}, None)
        warm_up.join(timeout=120)
        assert not warm_up.is_alive()
        assert _r4b_model.cache_info().currsize == len(EMITTED_RESOURCE_TYPES)
    finally:
        masters.dispose()
        services.store.close()


# ----------------------------------------------- the source schema is checked once per start


def test_the_source_schema_is_meta_checked_once_for_pack_and_validator() -> None:
    pack = load_pack(ROOT / "mappings")
    key = json.dumps(pack.source_schema, sort_keys=True, ensure_ascii=False)
    assert key in mapping_pack._ACCEPTED_SCHEMAS  # SubmissionValidator finds it there
    SubmissionValidator(pack.source_schema, pack.integrity)


def test_a_schema_is_checked_again_once_it_differs() -> None:
    schema: dict[str, Any] = {"type": "object", "properties": {"n": {"minimum": 1}}}
    check_source_schema(schema)
    schema["properties"]["n"]["minimum"] = "one"  # the same object, now not a schema
    with pytest.raises(jsonschema.SchemaError, match="'one' is not of type 'number'"):
        check_source_schema(schema)
    with pytest.raises(jsonschema.SchemaError):  # a rejected schema is never remembered
        SubmissionValidator(schema)


def test_a_worker_without_requests_warms_up_after_a_while(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "WARM_UP_AFTER_SECONDS", 0.0)
    app = create_app(
        Settings(database_url="sqlite://", db_auto_upgrade=True, mappings_dir=ROOT / "mappings")
    )
    _r4b_model.cache_clear()
    try:
        _WorkerHooks(app).post_fork(None, None)
        deadline = time.monotonic() + 120
        while _r4b_model.cache_info().currsize < len(EMITTED_RESOURCE_TYPES):
            assert time.monotonic() < deadline, "the worker never warmed up"
            time.sleep(0.01)
    finally:
        app.extensions["fhirbridge"].store.close()
