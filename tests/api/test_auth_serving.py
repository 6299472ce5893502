"""No authentication only on loopback: real gunicorn with fhirbridge.gunicorn_conf, and the CLI.

Also `fhirbridge auth new-key` / `hash-key`, whose entries a real server then accepts.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from click.testing import CliRunner

from fhirbridge.auth.apikeys import hash_key
from fhirbridge.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRBRIDGE_")}
    env.update(
        FHIRBRIDGE_DATABASE_URL=f"sqlite:///{tmp_path / 'serve.db'}",
        FHIRBRIDGE_MAPPINGS_DIR=str(ROOT / "mappings"),
        FHIRBRIDGE_DB_AUTO_UPGRADE="true",
        WEB_CONCURRENCY="1",
        **extra,
    )
    return env


def _gunicorn(bind: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "-c",
        "python:fhirbridge.gunicorn_conf",
        "--bind",
        bind,
        "fhirbridge:create_app()",
    ]


def _get(url: str, headers: dict[str, str] | None = None) -> int:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return int(exc.code)


@contextmanager
def _serving(cmd: list[str], env: dict[str, str], cwd: Path, port: int) -> Iterator[list[str]]:
    """Start `cmd`, wait for /healthz on 127.0.0.1:port; yields a list that gets its stderr."""
    stderr_file = cwd / "stderr.log"
    with stderr_file.open("wb") as err:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err)
    captured: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if _get(f"http://127.0.0.1:{port}/healthz") == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert proc.poll() is None, stderr_file.read_text()
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.2)
        yield captured
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        captured.append(stderr_file.read_text())


def test_gunicorn_serves_loopback_without_auth_with_a_warning(tmp_path: Path) -> None:
    port = _free_port()
    with _serving(_gunicorn(f"127.0.0.1:{port}"), _env(tmp_path), tmp_path, port) as stderr:
        # every scope without a key; search values are PHI: no access log line may carry them
        assert _get(f"http://127.0.0.1:{port}/fhir/Patient?family=Zelda-Quintessa") == 200
    assert "WARNING: AUTHENTICATION IS OFF." in stderr[0]
    assert "Zelda-Quintessa" not in stderr[0]


def test_gunicorn_refuses_all_interfaces_without_auth(tmp_path: Path) -> None:
    port = _free_port()
    done = subprocess.run(
        _gunicorn(f"0.0.0.0:{port}"),
        env=_env(tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "refusing to serve 0.0.0.0:" in done.stderr
    assert "Booting worker" not in done.stderr  # stopped before any worker started


def test_gunicorn_serves_all_interfaces_with_an_api_key(tmp_path: Path) -> None:
    made = CliRunner().invoke(
        main, ["auth", "new-key", "--client-id", "reader", "--scope", "fhir.read"]
    )
    assert made.exit_code == 0, made.output
    key, entry = made.stdout.splitlines()
    port = _free_port()
    env = _env(tmp_path, FHIRBRIDGE_AUTH_API_KEYS=f"[{entry}]")
    with _serving(_gunicorn(f"0.0.0.0:{port}"), env, tmp_path, port) as stderr:
        base = f"http://127.0.0.1:{port}"
        assert _get(f"{base}/fhir/Patient") == 401
        assert _get(f"{base}/fhir/Patient", {"X-API-Key": key}) == 200
        assert _get(f"{base}/api/v1/sync/status", {"Authorization": f"Bearer {key}"}) == 403
    assert "AUTHENTICATION IS OFF" not in stderr[0]
    assert key not in stderr[0]


def test_serve_refuses_a_public_address_without_auth(tmp_path: Path) -> None:
    for host in ("0.0.0.0", "::", "192.0.2.10"):
        result = CliRunner().invoke(main, ["serve", "--host", host], env=_env(tmp_path))
        assert result.exit_code == 2, result.output
        assert "refusing to serve" in result.stderr and "FHIRBRIDGE_AUTH_API_KEYS" in result.stderr
    assert not (tmp_path / "serve.db").exists()  # refused before the app was built


def test_serve_warns_loudly_on_loopback_without_auth(tmp_path: Path) -> None:
    port = _free_port()
    cmd = [sys.executable, "-m", "fhirbridge.cli", "serve", "--port", str(port), "--workers", "1"]
    with _serving(cmd, _env(tmp_path), tmp_path, port) as stderr:
        pass
    lines = [line for line in stderr[0].splitlines() if line.startswith("WARNING:")]
    assert len(lines) >= 3 and "AUTHENTICATION IS OFF" in lines[0]


def test_new_key_prints_the_key_once_and_its_entry() -> None:
    args = ["auth", "new-key", "--client-id", "lab-1", "--scope"]
    result = CliRunner().invoke(main, [*args, "submissions.write", "--scope", "fhir.read"])
    assert result.exit_code == 0, result.output
    key, line = result.stdout.splitlines()
    assert key.startswith("fbk_") and len(key) == 47
    entry = json.loads(line)
    assert entry == {
        "client_id": "lab-1",
        "sha256": hash_key(key),
        "scopes": ["submissions.write", "fhir.read"],
    }
    assert "shown once" in result.stderr and key not in result.stderr
    again = CliRunner().invoke(main, [*args, "fhir.read"])
    assert again.stdout.splitlines()[0] != key


def test_hash_key_reads_stdin() -> None:
    key = "fbk_" + "A" * 43
    result = CliRunner().invoke(
        main, ["auth", "hash-key", "--client-id", "ops", "--scope", "sync.admin"], input=key + "\n"
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "client_id": "ops",
        "sha256": hash_key(key),
        "scopes": ["sync.admin"],
    }


def test_auth_commands_refuse_bad_input() -> None:
    bad_key = CliRunner().invoke(
        main, ["auth", "hash-key", "--client-id", "ops", "--scope", "sync.admin"], input="secret\n"
    )
    assert bad_key.exit_code == 2 and "secret" not in bad_key.output
    bad_id = CliRunner().invoke(
        main, ["auth", "new-key", "--client-id", "has space", "--scope", "fhir.read"]
    )
    assert bad_id.exit_code == 2 and bad_id.stdout == ""
    bad_scope = CliRunner().invoke(
        main, ["auth", "new-key", "--client-id", "ops", "--scope", "admin"]
    )
    assert bad_scope.exit_code == 2
    no_scope = CliRunner().invoke(main, ["auth", "new-key", "--client-id", "ops"])
    assert no_scope.exit_code == 2
