"""A real FHIR R4 server (sekmet-fhir 0.1.1) run as a subprocess, for integration tests.

How it runs (see ``FhirServer.command``)::

    <python> -m sekmet.cli serve --config <workdir>/settings.yaml      (cwd = <workdir>)

``serve`` hands the config to ``uvicorn.run("sekmet.main:app_factory", factory=True, ...)``, so
this is sekmet's own supported way to start. The settings file (written by this module, JSON is
valid YAML) pins host 127.0.0.1, the port, ``base_url`` http://127.0.0.1:<port>/fhir, the data dir
``<workdir>/data`` (one SQLite file, ``sekmet.db``, WAL mode), ``simulator.enabled: false``
(otherwise sekmet *acts* on ServiceRequest/Task/MedicationRequest/... writes), ``validation.inbound:
strict`` and ``log_inbound: false`` (no per-request traffic rows in the db). The server's own
stdout/stderr go to ``<workdir>/sekmet.log`` (appended across restarts).

- ``stop()``  sends SIGTERM: uvicorn shuts down gracefully (about 0.2 s) and every committed write
  is in the SQLite file.
- ``start()`` (re)starts the same command: same port, same settings, same database, so data
  written before ``stop()``/``kill()`` is still there.
- ``kill()``  sends SIGKILL (a crash); SQLite's WAL keeps every committed transaction.

The ``SEKMET_*`` environment overrides (SEKMET_CONFIG, SEKMET_BASE_URL, SEKMET_DB, SEKMET_PORT,
SEKMET_PUBLIC_URL) are removed from the child's environment so an outer shell cannot redirect it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import requests

HOST = "127.0.0.1"
SEKMET_REQUIREMENT = "sekmet-fhir==0.1.1"
STARTUP_TIMEOUT = 30.0  # seconds; a normal start takes about 0.7 s
STOP_TIMEOUT = 10.0
REQUEST_TIMEOUT = 10.0
MAX_PAGES = 200  # bound on search paging (x _count=1000)
_ENV_OVERRIDES = (
    "SEKMET_CONFIG",
    "SEKMET_BASE_URL",
    "SEKMET_DB",
    "SEKMET_PORT",
    "SEKMET_PUBLIC_URL",
)


class SekmetUnavailable(RuntimeError):
    """sekmet-fhir is not installed, or its server could not be started."""


def sekmet_installed() -> bool:
    return importlib.util.find_spec("sekmet") is not None


def free_port(host: str = HOST) -> int:
    """A currently free TCP port on ``host`` (the OS picks it; the socket is closed again)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def default_settings(port: int, data_dir: Path) -> dict[str, Any]:
    """The sekmet settings used by the fixtures (sekmet.config.Settings fields)."""
    return {
        "base_url": f"http://{HOST}:{port}/fhir",
        "host": HOST,
        "port": port,
        "data_dir": str(data_dir),
        "simulator": {"enabled": False},
        "validation": {"inbound": "strict"},
        "server_auth": {"types": ["none"]},
        "log_inbound": False,
        "own_private_key_path": str(data_dir / "sekmet_private.pem"),
    }


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


class FhirServer:
    """A running (or stopped) sekmet process with its own work dir, port and database.

    ``extra_settings`` is deep-merged into the generated settings, e.g.
    ``{"server_auth": {"types": ["bearer"], "tokens": ["t0k"]}}`` or
    ``{"server_behaviour": {"absolute_references": True}}``.
    """

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        extra_settings: dict[str, Any] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.workdir / "data"
        self.config_path = self.workdir / "settings.yaml"
        self.log_path = self.workdir / "sekmet.log"
        self._port_chosen = port is None
        self._extra = extra_settings or {}
        self.port = port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._session = requests.Session()
        self._write_config()

    # ---------------- process control ----------------

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}/fhir"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "sekmet.db"

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "sekmet.cli", "serve", "--config", str(self.config_path)]

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _write_config(self) -> None:
        settings = _merge(default_settings(self.port, self.data_dir), self._extra)
        self.config_path.write_text(json.dumps(settings, indent=2) + "\n")

    def start(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Start (or restart) on the same port and data dir; return once /metadata answers 200."""
        if self.running:
            return
        if not sekmet_installed():
            raise SekmetUnavailable(f"sekmet-fhir not installed: pip install {SEKMET_REQUIREMENT}")
        attempts = 3 if self._port_chosen and self._proc is None else 1
        for attempt in range(attempts):
            try:
                self._spawn_and_wait(timeout)
                return
            except SekmetUnavailable:
                in_use = "address already in use" in self.log_tail().lower()
                if not in_use or attempt == attempts - 1:
                    raise
                self.port = free_port()  # lost a race for the port: pick another one
                self._write_config()

    def _spawn_and_wait(self, timeout: float) -> None:
        env = {k: v for k, v in os.environ.items() if k not in _ENV_OVERRIDES}
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in _reap()
        self._log.write(f"\n--- start {' '.join(self.command)}\n".encode())
        self._log.flush()
        self._proc = subprocess.Popen(
            self.command,
            cwd=self.workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._reap()
                raise SekmetUnavailable(
                    f"sekmet exited with {code} during startup:\n{self.log_tail()}"
                )
            if self.is_up():
                return
            time.sleep(0.05)
        self.kill()
        raise SekmetUnavailable(
            f"sekmet did not answer /metadata within {timeout}s:\n{self.log_tail()}"
        )

    def is_up(self) -> bool:
        try:
            with requests.get(f"{self.base_url}/metadata", timeout=1.0) as r:
                return r.status_code == 200
        except requests.RequestException:
            return False

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM and wait (SIGKILL if it has not exited after ``timeout``)."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(STOP_TIMEOUT)
        self._reap()

    def kill(self) -> None:
        """SIGKILL and wait."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(STOP_TIMEOUT)
        self._reap()

    def _reap(self) -> None:
        if self._proc is not None:
            self._proc.wait(STOP_TIMEOUT)  # returns at once: the process has exited
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        """Stop the server and release the client session (the fixture's teardown)."""
        try:
            self.stop()
        finally:
            self._session.close()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def __enter__(self) -> FhirServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<FhirServer {self.base_url} {state} pid={self.pid}>"

    # ---------------- client helpers (direct to the server, never through a proxy) ----------------

    def url(self, path: str = "") -> str:
        """``<base_url>/<path>``; the base itself (for transaction/batch POSTs) for ``""``."""
        path = path.lstrip("/")
        return f"{self.base_url}/{path}" if path else self.base_url

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """A request to ``<base_url>/<path>``; ``json=`` is sent as application/fhir+json."""
        kwargs.setdefault("timeout", REQUEST_TIMEOUT)
        headers = {"Accept": "application/fhir+json", **kwargs.pop("headers", {})}
        if "json" in kwargs:
            kwargs["data"] = json.dumps(kwargs.pop("json"))
            headers.setdefault("Content-Type", "application/fhir+json")
        return self._session.request(method, self.url(path), headers=headers, **kwargs)

    def read(self, rtype: str, rid: str) -> requests.Response:
        return self.request("GET", f"{rtype}/{rid}")

    def search_bundles(self, rtype: str, **params: str) -> list[dict[str, Any]]:
        """Every searchset page (following ``next`` links, at most MAX_PAGES)."""
        pages: list[dict[str, Any]] = []
        query: dict[str, str] = {"_count": "1000", **params}
        url: str | None = self.url(rtype)
        while url is not None and len(pages) < MAX_PAGES:
            r = self._session.get(
                url,
                params=query if not pages else None,
                headers={"Accept": "application/fhir+json"},
                timeout=REQUEST_TIMEOUT,
            )
            if r.status_code != 200:
                raise AssertionError(f"search {rtype} {params}: {r.status_code} {r.text[:1000]}")
            bundle: dict[str, Any] = r.json()
            pages.append(bundle)
            url = next(
                (ln["url"] for ln in bundle.get("link", []) if ln["relation"] == "next"), None
            )
        return pages

    def search(self, rtype: str, **params: str) -> list[dict[str, Any]]:
        """All matching resources (search.mode == "match"), all pages."""
        return [
            e["resource"]
            for page in self.search_bundles(rtype, **params)
            for e in page.get("entry", [])
            if e.get("search", {}).get("mode", "match") == "match"
        ]

    def count(self, rtype: str) -> int:
        """Number of current (not deleted) resources of ``rtype``."""
        r = self._session.get(
            self.url(rtype),
            params={"_summary": "count"},
            headers={"Accept": "application/fhir+json"},
            timeout=REQUEST_TIMEOUT,
        )
        r.raise_for_status()
        total: int = r.json()["total"]
        return total

    def wipe(self) -> None:
        """Empty the database: stop, delete the data dir, start again (same port)."""
        was_running = self.running
        self.stop()
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                Path(f"{self.db_path}{suffix}").unlink()
        if was_running:
            self.start()
