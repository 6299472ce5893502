"""The Dockerfile, exercised without Docker: its steps replayed in a fresh virtualenv, its CMD run.

The RUN, COPY, WORKDIR and ENV lines of both stages are replayed with the image's paths moved
into tmp (/opt/venv, /app, /src, /data, /tmp/prometheus) and port 8080 moved to a free one; the
runtime stage's user creation and chown need root and only concern the image, so they are the
only steps skipped. Then, as an operator would: the CMD refuses a database without migrations
(one error line, exit status 2), `fhirbridge db upgrade` (the init step) migrates it, the CMD —
gunicorn on 0.0.0.0, so with authentication, the API key read from a
FHIRBRIDGE_AUTH_API_KEYS_FILE secret — answers /readyz, the HEALTHCHECK command passes, and
`fhirbridge worker` runs until SIGTERM.

It installs every dependency from a package index: skipped with the reason when pip cannot
reach one (failed under CI=true). It takes a minute or two.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fhirbridge.auth.apikeys import entry, new_key

pytestmark = pytest.mark.container

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
IMAGE_PATHS = ("/opt/venv", "/app", "/src", "/data", "/tmp/prometheus")
ROOT_ONLY = ("useradd", "groupadd", "chown")  # the image's user: needs root, image-only
READY_TIMEOUT = 60.0


# ---------------------------------------------------------------------------------- parsing


@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == keyword]


def parse(text: str) -> list[Stage]:
    """Stages of a Dockerfile: continuation lines joined, comment lines dropped."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "Dockerfile ends inside a continuation line"
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stages.append(Stage(base=args.split()[0]))
        else:
            assert stages, f"{keyword} before FROM"
            stages[-1].instructions.append(Instruction(keyword, args.strip()))
    return stages


# ----------------------------------------------------------------------------- translation


class Sandbox:
    """The image's file system paths and port, moved into tmp and a free port."""

    def __init__(self, root: Path, port: int) -> None:
        self.root = root  # the image's "/", where a stage starts before any WORKDIR
        self.paths = {p: root / p.strip("/").replace("/", "-") for p in IMAGE_PATHS}
        self.port = port
        names = "|".join(re.escape(p) for p in sorted(IMAGE_PATHS, key=len, reverse=True))
        self._pattern = re.compile(rf"(?<![\w.-])({names})(?![\w.-])")

    def __call__(self, text: str) -> str:
        moved = self._pattern.sub(lambda m: str(self.paths[m.group(1)]), text)
        return moved.replace(":8080", f":{self.port}")


def _expand(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), ""), value)


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@dataclass
class Built:
    env: dict[str, str]  # the runtime stage's environment
    workdir: Path
    cmd: list[str]
    healthcheck: list[str]
    sandbox: Sandbox


def _replay(stages: list[Stage], sandbox: Sandbox, bin_dir: Path) -> Built:
    """Run every stage's steps; the last stage's environment, workdir and commands."""
    base_env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
    }
    for name in ("PIP_FIND_LINKS", "PIP_CERT", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        if name in os.environ:  # this machine's pip setup, as the build host's would be
            base_env[name] = os.environ[name]
    for path in sandbox.paths.values():
        assert not path.exists()
    sandbox.root.mkdir(parents=True)
    env: dict[str, str] = {}
    workdir = Path("/")
    cmd: list[str] = []
    healthcheck: list[str] = []
    for index, stage in enumerate(stages):
        last = index == len(stages) - 1
        env, workdir = dict(base_env), sandbox.root
        for step in stage.instructions:
            if step.keyword == "ENV":
                for token in shlex.split(step.args):
                    name, sep, value = token.partition("=")
                    assert sep, f"ENV {token}: use NAME=value"
                    env[name] = _expand(sandbox(value), env)
            elif step.keyword == "WORKDIR":
                workdir = Path(sandbox(step.args))
                workdir.mkdir(parents=True, exist_ok=True)
            elif step.keyword == "COPY":
                _copy(step.args, sandbox, workdir)
            elif step.keyword == "RUN":
                _run(step.args, sandbox, workdir, env, last)
            elif step.keyword == "CMD":
                cmd = [sandbox(a) for a in _exec_form(step.args)]
            elif step.keyword == "HEALTHCHECK":
                _, _, form = step.args.partition("CMD ")
                healthcheck = [sandbox(a) for a in _exec_form(form)]
    return Built(env=env, workdir=workdir, cmd=cmd, healthcheck=healthcheck, sandbox=sandbox)


def _copy(args: str, sandbox: Sandbox, workdir: Path) -> None:
    words = shlex.split(args)
    flags = [w for w in words if w.startswith("--")]
    *sources, dest = [w for w in words if not w.startswith("--")]
    target = workdir / sandbox(dest)
    if any(f.startswith("--from=") for f in flags):  # a path of the previous stage: same tmp
        assert [Path(sandbox(s)) for s in sources] == [target], args
        return
    for source in sources:
        origin = ROOT / source
        into = target / origin.name if dest.endswith("/") or len(sources) > 1 else target
        if origin.is_dir():
            shutil.copytree(origin, into, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            into.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, into)


def _run(args: str, sandbox: Sandbox, workdir: Path, env: dict[str, str], last: bool) -> None:
    command = re.sub(r"^(--\S+\s+)+", "", args)  # --mount=type=cache,...: BuildKit only
    parts = [p.strip() for p in command.split("&&")]
    if last:
        parts = [p for p in parts if not p.startswith(ROOT_ONLY)]
    for part in parts:
        done = subprocess.run(
            ["sh", "-c", sandbox(part)],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, f"RUN {part}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


# ------------------------------------------------------------------------------ the test


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse(DOCKERFILE.read_text())


def test_dockerfile_is_multi_stage_non_root_with_healthcheck(stages: list[Stage]) -> None:
    assert len(stages) >= 2
    runtime = stages[-1]
    users = runtime.all("USER")
    assert users and users[-1].split(":")[0] not in ("root", "0")
    (health,) = runtime.all("HEALTHCHECK")
    assert "/readyz" in health
    assert runtime.all("CMD") == [
        '["gunicorn", "-c", "python:fhirbridge.gunicorn_conf", "fhirbridge:create_app()"]'
    ]
    env = " ".join(runtime.all("ENV"))
    assert "PROMETHEUS_MULTIPROC_DIR=/tmp/prometheus" in env
    assert "GUNICORN_CMD_ARGS=" in env and "--bind 0.0.0.0:8080" in env
    setup = " ".join(runtime.all("RUN"))
    assert "mkdir -p /data /tmp/prometheus" in setup
    assert "chown 10001:10001 /data /tmp/prometheus" in setup
    assert users[-1] == "10001:10001"
    assert any("compileall" in run for run in stages[0].all("RUN"))


def _pip_reaches_an_index(tmp_path: Path) -> str | None:
    """None when pip can fetch a package; else why not."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(tmp_path), "alembic"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    return None if done.returncode == 0 else (done.stderr.strip().splitlines() or ["?"])[-1]


@pytest.fixture(scope="module")
def built(stages: list[Stage], tmp_path_factory: pytest.TempPathFactory) -> Built:
    why = _pip_reaches_an_index(tmp_path_factory.mktemp("pip-probe"))
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"pip cannot reach a package index: {why}")
        pytest.skip(f"pip cannot reach a package index: {why}")
    tmp = tmp_path_factory.mktemp("image")
    bin_dir = tmp / "host-bin"  # `python` in RUN lines: this interpreter's base Python
    bin_dir.mkdir()
    base = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    python = bin_dir / "python"
    python.write_text(f'#!/bin/sh\nexec {shlex.quote(base)} "$@"\n')
    python.chmod(0o755)
    return _replay(stages, Sandbox(tmp / "fs", _unused_port()), bin_dir)


def test_the_venv_is_compiled_and_carries_the_migrations(built: Built) -> None:
    venv = built.sandbox.paths["/opt/venv"]
    (package,) = venv.glob("lib/python3*/site-packages/fhirbridge")
    assert (package / "migrations" / "script.py.mako").is_file()
    assert (package / "migrations" / "versions" / "0001_initial_schema.py").is_file()
    assert list((package / "__pycache__").glob("db.cpython-*.pyc"))
    assert list((package / "migrations" / "versions" / "__pycache__").glob("0001_*.pyc"))
    for path in (built.sandbox.paths["/data"], built.sandbox.paths["/tmp/prometheus"]):
        assert path.is_dir()


@pytest.fixture(scope="module")
def api_key(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An API key in a secret file, as Docker/Kubernetes would mount it."""
    key = new_key()
    secret = tmp_path_factory.mktemp("secrets") / "api_keys"
    secret.write_text(json.dumps([entry(key, "container-test", ["fhir.read"])]) + "\n")
    built.env["FHIRBRIDGE_AUTH_API_KEYS_FILE"] = str(secret)
    yield key


def _start(argv: list[str], built: Built, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            argv, cwd=built.workdir, env=built.env, stdout=out, stderr=subprocess.STDOUT
        )


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    return proc.returncode


def _get(url: str, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_cmd_refuses_a_database_without_migrations(
    built: Built, api_key: str, tmp_path: Path
) -> None:
    assert not (built.sandbox.paths["/data"] / "fhirbridge.db").exists()
    log = tmp_path / "refused.log"
    proc = _start(built.cmd, built, log)
    try:
        proc.wait(timeout=READY_TIMEOUT)
    finally:
        _stop(proc)
    text = log.read_text()
    # The master refuses before binding or forking: one error line and exit 2, as
    # `fhirbridge serve` (not "Worker failed to boot", exit 3, a traceback per worker).
    assert proc.returncode == 2, text[-4000:]
    (line,) = [line for line in text.splitlines() if "run `fhirbridge db upgrade`" in line]
    assert json.loads(line)["level"] == "ERROR"
    assert "Traceback" not in text
    assert "Booting worker" not in text and "Listening at" not in text


def test_migrate_then_serve_then_work(built: Built, api_key: str, tmp_path: Path) -> None:
    fhirbridge = str(built.sandbox.paths["/opt/venv"] / "bin" / "fhirbridge")
    migrated = subprocess.run(
        [fhirbridge, "db", "upgrade"],
        cwd=built.workdir,
        env=built.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert migrated.returncode == 0, migrated.stderr
    assert (built.sandbox.paths["/data"] / "fhirbridge.db").is_file()

    base = f"http://127.0.0.1:{built.sandbox.port}"
    log = tmp_path / "api.log"
    proc = _start(built.cmd, built, log)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while _ready(base) != 200:
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "not ready in time\n" + log.read_text()[-4000:]
            time.sleep(0.5)
        health = subprocess.run(
            built.healthcheck, cwd=built.workdir, env=built.env, capture_output=True, timeout=30
        )
        assert health.returncode == 0, health.stderr
        assert _get(f"{base}/fhir/Patient") == 401  # 0.0.0.0: authentication is on
        assert _get(f"{base}/fhir/Patient", {"X-API-Key": api_key}) == 200
    finally:
        status = _stop(proc)
    assert status == 0, log.read_text()[-4000:]
    assert api_key not in log.read_text()

    targets = tmp_path / "targets.yaml"
    targets.write_text(
        f"targets:\n  - name: research\n    base_url: http://127.0.0.1:{_unused_port()}/fhir\n"
        "    profile: generic-r4\n"
    )
    built.env["FHIRBRIDGE_TARGETS"] = str(targets)
    worker_log = tmp_path / "worker.log"
    worker = _start([fhirbridge, "worker"], built, worker_log)
    try:
        deadline = time.monotonic() + 30
        while "sync worker" not in worker_log.read_text():
            assert worker.poll() is None, worker_log.read_text()
            assert time.monotonic() < deadline, worker_log.read_text()
            time.sleep(0.2)
        time.sleep(1.5)  # a few idle rounds
        assert worker.poll() is None, worker_log.read_text()
    finally:
        status = _stop(worker)
        del built.env["FHIRBRIDGE_TARGETS"]
    assert status == 0, worker_log.read_text()


def _ready(base: str) -> int | None:
    try:
        return _get(f"{base}/readyz")
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None
