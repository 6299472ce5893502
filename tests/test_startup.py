"""Cold start (issue 6): what create_app loads before the first answer, and how serve and the
container's gunicorn start (the app built once, in the master; a refusal in one line, exit 2).

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
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fhirbridge import create_app, db, gunicorn_conf
from fhirbridge.fhir.validate import EMITTED_RESOURCE_TYPES, _r4b_model
from fhirbridge.gunicorn_conf import WorkerHooks, start_up_objects_frozen
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
        with start_up_objects_frozen():
            assert not gc.isenabled()
            built = [{"start-up": i} for i in range(1000)]
        assert gc.isenabled()
        assert gc.get_freeze_count() >= frozen + len(built)
    finally:
        gc.unfreeze()  # the rest of the test session collects as usual


def test_serve_turns_the_collector_back_on_when_start_up_fails() -> None:
    with pytest.raises(SystemExit), start_up_objects_frozen():
        raise SystemExit(2)
    assert gc.isenabled()


def test_a_forked_worker_opens_its_own_connections_and_warms_up_after_answering(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gunicorn_conf, "WARM_UP_AFTER_SECONDS", 600.0)  # only an answer starts it
    database_url = f"sqlite:///{tmp_path / 'fork.db'}"
    store = ResourceStore.from_url(database_url)
    db.upgrade(store)
    store.close()
    app = create_app(Settings(database_url=database_url, mappings_dir=ROOT / "mappings"))
    services = app.extensions["fhirbridge"]
    masters = services.store.engine.pool
    assert masters.checkedin() == 1  # the migration check's connection, kept by the master
    _r4b_model.cache_clear()  # as in a fresh worker: no model looked up yet
    hooks = WorkerHooks(app)
    try:
        hooks.post_worker_init(None)
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
    monkeypatch.setattr(gunicorn_conf, "WARM_UP_AFTER_SECONDS", 0.0)
    app = create_app(
        Settings(database_url="sqlite://", db_auto_upgrade=True, mappings_dir=ROOT / "mappings")
    )
    _r4b_model.cache_clear()
    try:
        WorkerHooks(app).post_worker_init(None)
        deadline = time.monotonic() + 120
        while _r4b_model.cache_info().currsize < len(EMITTED_RESOURCE_TYPES):
            assert time.monotonic() < deadline, "the worker never warmed up"
            time.sleep(0.01)
    finally:
        app.extensions["fhirbridge"].store.close()


# ------------------------------------- the container's gunicorn: the app built once, in the master

COUNTING_FACTORY = """
import os
from pathlib import Path

from fhirbridge import create_app as _create_app


def create_app():
    # fhirbridge's factory, noting the pid of every process that builds an app
    with Path(os.environ["BUILDS_LOG"]).open("a") as log:
        log.write(f"{os.getpid()}\\n")
    return _create_app()
"""


class _Gunicorn:
    """The container's command (gunicorn -c python:fhirbridge.gunicorn_conf) on a free port,
    with fhirbridge's factory wrapped to note which processes build an app."""

    def __init__(self, tmp_path: Path, database_url: str, **env: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        (tmp_path / "counting.py").write_text(COUNTING_FACTORY)
        self.builds_log = tmp_path / "builds.log"
        self.stderr = tmp_path / "gunicorn.err"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("FHIRBRIDGE_")}
        environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        environ |= {
            "FHIRBRIDGE_DATABASE_URL": database_url,
            "FHIRBRIDGE_MAPPINGS_DIR": str(ROOT / "mappings"),
            "BUILDS_LOG": str(self.builds_log),
            "WEB_CONCURRENCY": "2",
            **env,
        }
        with self.stderr.open("wb") as err:
            self.proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", "gunicorn", "-c", "python:fhirbridge.gunicorn_conf"),
                    *("--bind", f"127.0.0.1:{self.port}", "--pythonpath", str(tmp_path)),
                    "counting:create_app()",
                ],
                env=environ,
                cwd=tmp_path,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    def builds(self) -> list[int]:
        text = self.builds_log.read_text() if self.builds_log.exists() else ""
        return [int(line) for line in text.split()]

    def log(self) -> str:
        return self.stderr.read_text()

    def readyz(self) -> int | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=10) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            exc.close()
            return int(exc.code)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    def wait_until(self, what: str, done: Any, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert self.proc.poll() is None, f"{what}: gunicorn exited\n{self.log()[-4000:]}"
            assert time.monotonic() < deadline, f"{what}: not in time\n{self.log()[-4000:]}"
            time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def _migrated(tmp_path: Path, revision: str = "head") -> str:
    url = f"sqlite:///{tmp_path / 'container.db'}"
    store = ResourceStore.from_url(url)
    try:
        if revision == "head":
            db.upgrade(store)
        else:
            from alembic import command

            with store.write() as conn:
                command.upgrade(db.alembic_config(conn), revision)
    finally:
        store.close()
    return url


def test_the_container_builds_the_app_once_in_the_master_and_forks_its_workers(
    tmp_path: Path,
) -> None:
    server = _Gunicorn(tmp_path, _migrated(tmp_path))
    try:
        server.wait_until("ready", lambda: server.readyz() == 200)
        server.wait_until("two workers", lambda: server.log().count("Booting worker") == 2)
        assert all(server.readyz() == 200 for _ in range(6))
        assert server.builds() == [server.proc.pid]  # once, by the master, before any worker
    finally:
        status = server.stop()
    assert status == 0, server.log()[-4000:]


def test_the_container_refuses_a_database_behind_head_in_one_line_with_status_2(
    tmp_path: Path,
) -> None:
    server = _Gunicorn(tmp_path, _migrated(tmp_path, "0001"))
    try:
        status = server.proc.wait(timeout=60)
    finally:
        server.stop()
    log = server.log()
    assert status == 2, log[-4000:]
    (line,) = [line for line in log.splitlines() if "fhirbridge db upgrade" in line]
    assert json.loads(line)["level"] == "ERROR"
    assert f"needs {db.head()}" in json.loads(line)["message"]
    assert "Traceback" not in log
    assert "Booting worker" not in log and "Listening at" not in log  # no socket, no worker
    assert server.builds() == [server.proc.pid]


def test_a_hup_builds_the_app_again_and_a_refused_build_keeps_the_running_one(
    tmp_path: Path,
) -> None:
    mappings = tmp_path / "mappings"
    shutil.copytree(ROOT / "mappings", mappings)
    server = _Gunicorn(
        tmp_path, _migrated(tmp_path), FHIRBRIDGE_MAPPINGS_DIR=str(mappings), WEB_CONCURRENCY="1"
    )
    try:
        server.wait_until("ready", lambda: server.readyz() == 200)
        server.proc.send_signal(signal.SIGHUP)  # new settings and mappings, new workers
        server.wait_until("rebuilt", lambda: len(server.builds()) == 2)
        server.wait_until("a new worker", lambda: server.log().count("Booting worker") == 2)
        server.wait_until("ready again", lambda: server.readyz() == 200)
        with (mappings / "pack.yaml").open("a") as pack:
            pack.write("version: [\n")  # malformed YAML
        server.proc.send_signal(signal.SIGHUP)
        server.wait_until("refused", lambda: "reload refused" in server.log())
        server.wait_until("a third worker", lambda: server.log().count("Booting worker") == 3)
        assert server.readyz() == 200  # the running app, in a new worker
        assert server.builds() == [server.proc.pid] * 3
    finally:
        status = server.stop()
    assert status == 0, server.log()[-4000:]
    (refused,) = [line for line in server.log().splitlines() if "reload refused" in line]
    assert "pack.yaml" in json.loads(refused)["message"]
