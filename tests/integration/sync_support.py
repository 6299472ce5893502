"""Helpers for the sync durability tests: a large queue, `fhirbridge worker` subprocesses, checks.

- ``mapped(n)``: the medicine-session fixture mapped ``n`` times with every source id made
  distinct per submission (``distinct``); cached per process, so tests that need the same queue
  do not map it twice. Practitioners (``t-lead``, ``t-co``) and the Medication are shared by all
  submissions, as in a real clinic: ``n`` submissions give ``24 n + 3`` distinct resources.
- ``queue(store, outbox, results)``: store each submission and queue its deliveries in one
  transaction, exactly as the API does.
- ``WorkerProcess``: ``python -m fhirbridge.cli worker`` with a clean FHIRBRIDGE_* environment,
  its output in a log file; ``kill()`` is SIGKILL, ``stop()`` SIGTERM; always reaped.
- ``wait_until``: poll with a deadline (every wait in these tests is bounded).
- ``server_resources``: everything of one type on the server, read by search (all pages).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, TypeVar

from sqlalchemy import Connection, func, select

from fhirbridge.fhir.validate import OutputValidator
from fhirbridge.mapping.pack import load_pack
from fhirbridge.pipeline import transform
from fhirbridge.store.resources import ResourceStore, SaveResult
from fhirbridge.store.schema import delivery, metadata
from fhirbridge.sync.outbox import Outbox
from fhirbridge.validation import SubmissionValidator

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "mappings/fixtures/medicine-session.in.json"
DOC: dict[str, Any] = json.loads(FIXTURE.read_text())
SHARED = 3  # resources every submission shares: 2 Practitioners, 1 Medication
PER_SUBMISSION = 27 - SHARED

T = TypeVar("T")


@functools.cache
def _pack() -> Any:
    return load_pack(ROOT / "mappings")


@functools.cache
def _validators() -> tuple[SubmissionValidator, OutputValidator]:
    pack = _pack()
    return SubmissionValidator(pack.source_schema, pack.integrity), OutputValidator()


def distinct(doc: dict[str, Any], n: int, *, mrn: str | None = None) -> dict[str, Any]:
    """The fixture with every source id made unique to submission n (ids are unique per source)."""
    text = json.dumps(doc)
    for prefix in ('"p-', '"s-', '"d-', '"v-', '"ae-', '"a-'):
        text = text.replace(prefix, f"{prefix}{n}-")
    out: dict[str, Any] = json.loads(text)
    if mrn is not None:
        out["patient"]["mrn"] = mrn
    return out


def map_one(doc: dict[str, Any]) -> Any:
    source_validator, output_validator = _validators()
    return transform(
        doc,
        pack=_pack(),
        input_validator=source_validator,
        output_validator=output_validator,
        now=datetime.now(UTC),
    )


@functools.cache
def mapped(n: int) -> tuple[Any, ...]:
    """``n`` distinct submissions, mapped (cached: the results are never mutated)."""
    return tuple(map_one(distinct(DOC, i)) for i in range(n))


def queue(store: ResourceStore, outbox: Outbox, results: Iterable[Any]) -> list[dict[str, Any]]:
    """Store each mapped submission and queue its deliveries; every distinct resource stored."""
    stored: dict[tuple[str, str], dict[str, Any]] = {}
    for result in results:
        now = datetime.now(UTC)
        patient = next(r for r in result.resources if r["resourceType"] == "Patient")

        def enqueue(
            conn: Connection,
            saved: SaveResult,
            ref: str = f"Patient/{patient['id']}",
            now: datetime = now,
        ) -> None:
            outbox.enqueue(conn, saved, patient_ref=ref, now=now)

        store.save_submission(
            submission_id=result.submission_id,
            source=result.source,
            patient_id=patient["id"],
            content_hash=result.content_hash,
            resources=copy.deepcopy(result.resources),
            summary={},
            now=now,
            on_saved=enqueue,
        )
        for r in result.resources:
            stored.setdefault((r["resourceType"], r["id"]), r)
    return list(stored.values())


def empty_tables(store: ResourceStore) -> None:
    """Delete every row (the PostgreSQL test schema is shared by the whole session)."""
    with store.engine.begin() as conn:
        for table in reversed(metadata.sorted_tables):
            conn.execute(table.delete())


def statuses(store: ResourceStore) -> Counter[str]:
    """Ledger rows per status (all targets)."""
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(delivery.c.status, func.count()).group_by(delivery.c.status)
        ).all()
    return Counter({status: n for status, n in rows})


def wait_until(
    check: Callable[[], T | bool | None],
    *,
    timeout: float,
    what: str,
    interval: float = 0.05,
    on_timeout: Callable[[], str] = lambda: "",
) -> T:
    """Poll ``check`` until it returns something truthy (returned), at most ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}. {on_timeout()}")
        time.sleep(interval)


def open_rows(store: ResourceStore) -> Counter[tuple[str, str, str]]:
    """(status, type, reason) of the rows not sent, counted: what a timeout message shows."""
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(delivery.c.status, delivery.c.resource_type, delivery.c.last_error).where(
                delivery.c.status != "sent"
            )
        ).all()
    return Counter((r[0], r[1], str(r[2])) for r in rows)


def write_targets(path: Path, targets: list[dict[str, Any]]) -> Path:
    """A targets file (JSON is valid YAML)."""
    path.write_text(json.dumps({"targets": targets}, indent=2) + "\n")
    return path


class WorkerProcess:
    """A ``fhirbridge worker`` subprocess; output appended to ``log_path``."""

    def __init__(self, log_path: Path, env: Mapping[str, str], *, once: bool = False) -> None:
        self.log_path = log_path
        base = {k: v for k, v in os.environ.items() if not k.startswith("FHIRBRIDGE_")}
        self.env = {**base, **env}
        self.command = [sys.executable, "-m", "fhirbridge.cli", "worker"] + (
            ["--once"] if once else []
        )
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> WorkerProcess:
        assert self._proc is None, "already started"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in _reap()
        self._proc = subprocess.Popen(
            self.command,
            cwd=self.log_path.parent,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        return self

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def kill(self) -> None:
        """SIGKILL (a crash: no cleanup, leases left behind) and reap."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
        self._reap()

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (the worker finishes its pass and exits); SIGKILL after ``timeout``."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        code = self._proc.returncode if self._proc is not None else None
        self._reap()
        return code

    def wait(self, timeout: float) -> int:
        assert self._proc is not None
        try:
            return self._proc.wait(timeout)
        finally:
            if self._proc.poll() is None:
                self._proc.kill()
            self._reap()

    def _reap(self) -> None:
        if self._proc is not None:
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
                self._proc.kill()
                self._proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def server_resources(
    server: Any, rtype: str, headers: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """Every current resource of ``rtype`` on the server (search, all pages, bounded)."""
    import requests

    out: list[dict[str, Any]] = []
    url: str | None = server.url(rtype)
    params: dict[str, str] | None = {"_count": "1000"}
    hdrs = {"Accept": "application/fhir+json", **(headers or {})}
    for _ in range(50):
        if url is None:
            return out
        r = requests.get(url, params=params, headers=hdrs, timeout=30)
        assert r.status_code == 200, f"search {rtype}: {r.status_code} {r.text[:500]}"
        bundle = r.json()
        out += [
            e["resource"]
            for e in bundle.get("entry", [])
            if e.get("search", {}).get("mode", "match") == "match"
        ]
        url = next((ln["url"] for ln in bundle.get("link", []) if ln["relation"] == "next"), None)
        params = None
    raise AssertionError(f"search {rtype}: more than 50 pages")


def strip_meta(resource: Mapping[str, Any]) -> dict[str, Any]:
    """A resource without the server-assigned meta (versionId, lastUpdated, source)."""
    out = copy.deepcopy(dict(resource))
    meta = out.get("meta", {})
    for key in ("versionId", "lastUpdated", "source"):
        meta.pop(key, None)
    if not meta:
        out.pop("meta", None)
    return out


def by_type(resources: Iterable[Mapping[str, Any]]) -> Counter[str]:
    return Counter(r["resourceType"] for r in resources)
