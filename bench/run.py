"""fhirbridge's benchmark: one command, a table of medians and ratios, and a JSON file.

    .venv/bin/python -m bench.run                 # everything (~10 min on 2 cores)
    .venv/bin/python -m bench.run --quick         # smaller sizes, same code paths (~2 min)
    .venv/bin/python -m bench.run --only pipeline,api

Shared machines are noisy, so every figure is the median over repeated runs (min and max
shown too) and, where the issue sets one, a ratio against a ceiling measured in the same run:

1. pipeline: resources/s on one core through input validation, mapping, output validation
   (R4B models + official R4 JSON Schema) and serialization, on a realistic mix of medicine,
   preparation and integration sessions; ceiling: R4B `model_validate` alone on the same
   output resources. CPU time of this process (time.process_time), not wall time.
2. api: POST /api/v1/submissions with distinct small submissions, gunicorn with 2 workers,
   API-key auth on, a closed-loop load generator on loopback; ceiling: a trivial Flask JSON
   endpoint served the same way in the same run. Requests/s, p50, p99.
3. sync: delivering ~5,000 resources to a fresh local sekmet-fhir server, transaction and
   one-request-per-resource modes; ceiling: a bare `requests` loop posting the same
   pre-built Bundles / resources to another fresh server.
4. cold start: from launching `fhirbridge serve`, and the image's gunicorn CMD, to the first
   200 from /readyz, with compiled bytecode as an installed wheel has it.
5. scaling: time per resource for one submission of 10 and of 1,000 records; peak RSS
   (VmHWM, read while the process runs) of `fhirbridge map` over an NDJSON of 100,000
   submissions and of `fhirbridge worker` draining a queue of 100,000 resources.

Results go to bench/results/latest.json (and a timestamped copy). Not a test: figures depend
on the machine; tests/test_bench.py runs `--quick --smoke` to keep this command working.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402

from bench import loadgen, workload  # noqa: E402

BIN = Path(sys.executable).parent
RESULTS = ROOT / "bench" / "results"


# ------------------------------------------------------------------------------ results


@dataclass
class Row:
    """One line of the table: a measured figure, optionally its ceiling and target."""

    section: str
    name: str
    unit: str
    runs: list[float]
    ceiling_runs: list[float] = field(default_factory=list)
    ratio_runs: list[float] = field(default_factory=list)
    target: str = ""
    met: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def ratio(self) -> float | None:
        return statistics.median(self.ratio_runs) if self.ratio_runs else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "section": self.section,
            "name": self.name,
            "unit": self.unit,
            "median": self.median,
            "min": min(self.runs),
            "max": max(self.runs),
            "runs": self.runs,
            "ceiling_median": statistics.median(self.ceiling_runs) if self.ceiling_runs else None,
            "ratio_median": self.ratio,
            "ratio_runs": self.ratio_runs,
            "target": self.target,
            "met": self.met,
            **({"extra": self.extra} if self.extra else {}),
        }


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(rows: list[Row]) -> str:
    head = [
        "section",
        "figure",
        "median",
        "min",
        "max",
        "unit",
        "ceiling",
        "ratio",
        "target",
        "met",
    ]
    lines = [head]
    for r in rows:
        d = r.to_dict()
        lines.append(
            [
                r.section,
                r.name,
                _fmt(d["median"]),
                _fmt(d["min"]),
                _fmt(d["max"]),
                r.unit,
                _fmt(d["ceiling_median"]),
                _fmt(d["ratio_median"]),
                r.target,
                {True: "yes", False: "NO", None: ""}[r.met],
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |"
        for line in lines
    ]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": os.getloadavg(),
    }


# ------------------------------------------------------------------------------ helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_http(
    url: str, timeout: float, *, body: bytes | None = None, interval: float = 0.005
) -> float:
    """Poll `url` until it answers 200 to a GET (with `body`: to a JSON POST of it); the
    monotonic time it did."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    method = "GET" if body is None else "POST"
    headers = {} if body is None else {"Content-Type": "application/json"}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection(parts.netloc, timeout=2)  # host:port
            conn.request(method, parts.path, body=body, headers=headers)
            answered = conn.getresponse().status == 200
            conn.close()
            if answered:
                return time.monotonic()
        except OSError:
            pass
        time.sleep(interval)
    raise TimeoutError(f"{url} did not answer 200 within {timeout} s")


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def pipeline_parts() -> tuple[Any, Any, Any]:
    from fhirbridge.fhir.validate import OutputValidator
    from fhirbridge.mapping.pack import load_pack
    from fhirbridge.validation import SubmissionValidator

    pack = load_pack(ROOT / "mappings")
    output = OutputValidator()
    output.warm()
    return pack, SubmissionValidator(pack.source_schema, pack.integrity), output


def service_env(tmp: Path, **extra: str) -> tuple[dict[str, str], str]:
    """Environment of a benchmarked fhirbridge process, and the API key it accepts."""
    import hashlib
    import secrets

    key = "fbk_" + secrets.token_urlsafe(32)
    entry = {
        "client_id": "bench",
        "sha256": hashlib.sha256(key.encode()).hexdigest(),
        "scopes": ["submissions.write", "fhir.read", "sync.admin"],
    }
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FHIRBRIDGE_")},
        "FHIRBRIDGE_DATABASE_URL": f"sqlite:///{tmp / 'fhirbridge.db'}",
        "FHIRBRIDGE_MAPPINGS_DIR": str(ROOT / "mappings"),
        "FHIRBRIDGE_AUTH_API_KEYS": json.dumps([entry]),
        # The load generator is one client sending as fast as it can: a per-client limit
        # would measure the limiter. Everything else stays as in production.
        "FHIRBRIDGE_RATE_LIMIT": "",
        **extra,
    }
    return env, key


def db_upgrade(env: dict[str, str]) -> None:
    subprocess.run(
        [str(BIN / "fhirbridge"), "db", "upgrade"],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


# ------------------------------------------------------------------------------ 1. pipeline


def bench_pipeline(repeats: int, submissions: int) -> list[Row]:
    from fhirbridge.fhir.bundle import transaction_bundle
    from fhirbridge.fhir.validate import _r4b_model
    from fhirbridge.pipeline import transform

    pack, iv, ov = pipeline_parts()
    docs = [workload.realistic_mix(i) for i in range(submissions)]
    now = datetime.now(UTC)
    outputs = [
        transform(d, pack=pack, input_validator=iv, output_validator=ov, now=now) for d in docs
    ]
    resources = [r for o in outputs for r in o.resources]
    models = [(_r4b_model(r["resourceType"]), r) for r in resources]
    count = len(resources)
    rates, ceilings, ratios = [], [], []
    for _ in range(repeats):
        start = time.process_time()
        for d in docs:
            result = transform(d, pack=pack, input_validator=iv, output_validator=ov, now=now)
            orjson.dumps(transaction_bundle(result.resources))
        ours = count / (time.process_time() - start)
        start = time.process_time()
        for model, r in models:
            model.model_validate(r)
        ceiling = count / (time.process_time() - start)
        rates.append(ours)
        ceilings.append(ceiling)
        ratios.append(ours / ceiling)
    rate, ratio = statistics.median(rates), statistics.median(ratios)
    return [
        Row(
            "pipeline",
            f"mix of {submissions} submissions ({count} resources)",
            "resources/s/core",
            rates,
            ceilings,
            ratios,
            target=">= 4,000/s and ratio >= 0.6",
            met=rate >= 4000 and ratio >= 0.6,
        )
    ]


# ------------------------------------------------------------------------------ 2. api


def _gunicorn(app: str, port: int, env: dict[str, str], conf: bool) -> subprocess.Popen[Any]:
    cmd = [str(BIN / "gunicorn")]
    if conf:
        cmd += ["-c", "python:fhirbridge.gunicorn_conf"]
    cmd += ["--bind", f"127.0.0.1:{port}", "--workers", "2", app]
    return subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def bench_api(repeats: int, seconds: float) -> list[Row]:
    expected = int(seconds * 3000) + 1000  # more bodies than any run can send
    rps, p50, p99, floor_rps, floor_p99, ratios = [], [], [], [], [], []
    offset = 0
    for _ in range(repeats):
        bodies = [orjson.dumps(workload.small(offset + i)) for i in range(expected)]
        offset += expected
        with tempfile.TemporaryDirectory() as tmp:
            env, key = service_env(Path(tmp))
            db_upgrade(env)
            port = free_port()
            server = _gunicorn("fhirbridge:create_app()", port, env, conf=True)
            try:
                wait_http(f"http://127.0.0.1:{port}/readyz", 60)
                # Warm-up (discarded): each worker's first requests load what it loads lazily.
                warm = [orjson.dumps(workload.small(10_000_000 + offset + i)) for i in range(200)]
                loadgen.run(
                    f"http://127.0.0.1:{port}/api/v1/submissions",
                    warm,
                    seconds=1.0,
                    headers={"X-API-Key": key},
                    ok_status=(201,),
                )
                ours = loadgen.run(
                    f"http://127.0.0.1:{port}/api/v1/submissions",
                    bodies,
                    seconds=seconds,
                    headers={"X-API-Key": key},
                    ok_status=(201,),
                )
            finally:
                stop(server)
        port = free_port()
        server = _gunicorn("bench.trivial_app:create_app()", port, env, conf=False)
        try:
            wait_http(f"http://127.0.0.1:{port}/echo", 60, body=b"{}", interval=0.02)
            loadgen.run(f"http://127.0.0.1:{port}/echo", bodies[:200], seconds=1.0)
            floor = loadgen.run(f"http://127.0.0.1:{port}/echo", bodies, seconds=seconds)
        finally:
            stop(server)
        if ours.errors or floor.errors:
            print(
                f"  api: {ours.errors} errors (fhirbridge), {floor.errors} (trivial)",
                file=sys.stderr,
            )
        rps.append(ours.rps)
        p50.append(ours.percentile(0.5))
        p99.append(ours.percentile(0.99))
        floor_rps.append(floor.rps)
        floor_p99.append(floor.percentile(0.99))
        ratios.append(ours.rps / floor.rps)
    ratio, tail = statistics.median(ratios), statistics.median(p99)
    return [
        Row(
            "api",
            "POST /api/v1/submissions (gunicorn, 2 workers)",
            "requests/s",
            rps,
            floor_rps,
            ratios,
            target="ratio >= 0.3",
            met=ratio >= 0.3,
        ),
        Row("api", "  latency p50", "ms", p50),
        Row("api", "  latency p99", "ms", p99, floor_p99, target="<= 25 ms", met=tail <= 25),
    ]


# ------------------------------------------------------------------------------ 3. sync


def _queued_store(path: Path, docs: list[dict[str, Any]], parts: tuple[Any, Any, Any]) -> Any:
    """A store holding `docs` mapped and queued for target `ehr`; (store, outbox, bundles)."""
    from fhirbridge.fhir.bundle import transaction_bundle
    from fhirbridge.pipeline import transform
    from fhirbridge.store.resources import ResourceStore
    from fhirbridge.sync.outbox import Outbox, Route

    pack, iv, ov = parts
    store = ResourceStore.from_url(f"sqlite:///{path}")
    store.create_schema()
    outbox = Outbox(store, [Route("ehr")])
    bundles = []
    for doc in docs:
        now = datetime.now(UTC)
        result = transform(doc, pack=pack, input_validator=iv, output_validator=ov, now=now)
        bundles.append(transaction_bundle(result.resources))
        patient = f"Patient/{result.resources[0]['id']}"

        def queue(conn: Any, saved: Any, patient: str = patient, now: datetime = now) -> None:
            outbox.enqueue(conn, saved, patient_ref=patient, now=now)

        store.save_submission(
            submission_id=result.submission_id,
            source=result.source,
            patient_id=patient,
            content_hash=result.content_hash,
            resources=result.resources,
            summary={},
            now=now,
            on_saved=queue,
        )
    return store, outbox, bundles


def _bare(base_url: str, bundles: list[dict[str, Any]], mode: str) -> float:
    import requests

    session = requests.Session()
    # The same headers fhirbridge's client sends with a write (return=minimal included), so
    # the server does the same work for both and the ratio measures fhirbridge's own cost.
    headers = {
        "Content-Type": "application/fhir+json",
        "Accept": "application/fhir+json",
        "Prefer": "return=minimal",
    }
    payloads: list[tuple[str, bytes]] = []
    for bundle in bundles:  # pre-built and pre-serialized: the ceiling does no work of ours
        if mode == "transaction":
            payloads.append((base_url, orjson.dumps(bundle)))
        else:
            for entry in bundle["entry"]:
                r = entry["resource"]
                payloads.append((f"{base_url}/{r['resourceType']}/{r['id']}", orjson.dumps(r)))
    start = time.perf_counter()
    for url, data in payloads:
        if mode == "transaction":
            session.post(url, data=data, headers=headers, timeout=120).raise_for_status()
        else:
            session.put(url, data=data, headers=headers, timeout=120).raise_for_status()
    elapsed = time.perf_counter() - start
    session.close()
    return elapsed


def _unsent(store: Any, *, by_error: bool = False) -> dict[str, int]:
    """The deliveries not sent yet, counted by status (`by_error`: by "status: last error", a
    slower query, for a report); empty once all are sent, so the drain loop polls it cheaply."""
    from sqlalchemy import func, select

    from fhirbridge.store.schema import delivery

    keys = (delivery.c.status, delivery.c.last_error) if by_error else (delivery.c.status,)
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(*keys, func.count()).where(delivery.c.status != "sent").group_by(*keys)
        ).all()
    return {": ".join(str(v) for v in row[:-1]): row[-1] for row in rows}


def bench_sync(repeats: int, resources: int, concurrency: int) -> list[Row]:
    import dataclasses

    from fhirbridge.ehr.client import EhrClient
    from fhirbridge.sync.capabilities import load_profile
    from fhirbridge.sync.targets import Target
    from fhirbridge.sync.worker import TargetRuntime, Worker
    from tests.integration.fhir_server import FhirServer

    parts = pipeline_parts()
    submissions = max(1, -(-resources // 27))  # a medicine session maps to 27 resources
    rows = []
    offset = 0
    for mode in ("transaction", "single"):
        ours_rates, bare_rates, ratios = [], [], []
        for _ in range(repeats):
            docs = [workload.medicine_session(offset + i) for i in range(submissions)]
            offset += submissions
            with tempfile.TemporaryDirectory() as tmp:
                store, outbox, bundles = _queued_store(Path(tmp) / "db.sqlite", docs, parts)
                count = sum(len(b["entry"]) for b in bundles)
                bare_server = FhirServer(Path(tmp) / "bare")
                bare_server.start()
                try:
                    bare = _bare(bare_server.base_url, bundles, mode)
                finally:
                    bare_server.close()
                server = FhirServer(Path(tmp) / "ours")
                server.start()
                caps = load_profile("generic-r4")
                if mode == "single":
                    caps = dataclasses.replace(caps, transaction=False, batch=False)
                target = Target(name="ehr", base_url=server.base_url, profile="generic-r4")
                # As `fhirbridge worker --concurrency N`: one Worker and client per slot.
                clients = [EhrClient(server.base_url) for _ in range(concurrency)]
                workers = [
                    Worker(store, outbox, [TargetRuntime(target, caps, c)], owner=f"bench-{n}")
                    for n, c in enumerate(clients)
                ]

                def drain(worker: Worker, store: Any = store) -> None:
                    # As the worker loop does: rest briefly when nothing is due (a patient
                    # may wait for a shared Medication another slot is sending), until done.
                    while _unsent(store):
                        if not worker.run_once():
                            time.sleep(0.05)

                try:
                    start = time.perf_counter()
                    threads = [threading.Thread(target=drain, args=(w,)) for w in workers]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                    ours = time.perf_counter() - start
                    unsent = _unsent(store, by_error=True)
                    if unsent:  # a figure for a sync that did not finish would mean nothing
                        raise RuntimeError(
                            f"sync bench ({mode}, {concurrency} in flight): "
                            f"{sum(unsent.values())} resources not sent: {unsent}"
                        )
                finally:
                    for c in clients:
                        c.close()
                    store.close()
                    server.close()
            ours_rates.append(count / ours)
            bare_rates.append(count / bare)
            ratios.append(bare / ours)
        ratio = statistics.median(ratios)
        label = "transaction Bundles" if mode == "transaction" else "one request per resource"
        rows.append(
            Row(
                "sync",
                f"{label}, {concurrency} in flight ({count} resources)",
                "resources/s",
                ours_rates,
                bare_rates,
                ratios,
                target="ratio >= 0.9",
                met=ratio >= 0.9,
            )
        )
    return rows


# ------------------------------------------------------------------------------ 4. cold start


def bench_cold_start(repeats: int) -> list[Row]:
    """From launching the server to its first 200 from /readyz, on a database at head.

    Two launchers, alternated so that both see the same machine: `fhirbridge serve` and the
    image's CMD (gunicorn -c python:fhirbridge.gunicorn_conf, two workers, with a
    PROMETHEUS_MULTIPROC_DIR as the image sets). Settings as a user starts them: API keys and
    the default rate limit (service_env turns it off for the throughput sections).

    Compiled bytecode, as installed: a wheel and the image carry a .pyc for every module, but
    this checkout's editable install has none for fhirbridge's own modules when
    PYTHONDONTWRITEBYTECODE is set, and every launch would compile them again (~0.1 s). So the
    launches keep their bytecode under a PYTHONPYCACHEPREFIX of their own (the checkout is not
    written to), which one unmeasured launch of each fills first.
    """
    launchers = ("serve", "gunicorn")
    runs: dict[str, list[float]] = {name: [] for name in launchers}
    with tempfile.TemporaryDirectory() as tmp:
        env, _key = service_env(Path(tmp))
        del env["FHIRBRIDGE_RATE_LIMIT"]
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "pycache")
        db_upgrade(env)  # a restart, not a first install: the schema is already there
        image_env = {**env, "PROMETHEUS_MULTIPROC_DIR": str(Path(tmp) / "prometheus")}
        Path(image_env["PROMETHEUS_MULTIPROC_DIR"]).mkdir()

        def launch(name: str) -> float:
            port = free_port()
            start = time.monotonic()
            if name == "serve":
                proc = subprocess.Popen(
                    [str(BIN / "fhirbridge"), "serve", "--port", str(port)],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            else:
                proc = _gunicorn("fhirbridge:create_app()", port, image_env, conf=True)
            try:
                return wait_http(f"http://127.0.0.1:{port}/readyz", 60) - start
            finally:
                stop(proc)

        for name in launchers:
            launch(name)  # fills the bytecode cache: not measured
        for _ in range(repeats):
            for name in launchers:
                runs[name].append(launch(name))
    extra = {"bytecode": "compiled (PYTHONPYCACHEPREFIX)", "rate_limit": "default"}
    return [
        Row(
            "cold start",
            "fhirbridge serve -> first 200 /readyz",
            "s",
            runs["serve"],
            target="<= 1 s",
            met=statistics.median(runs["serve"]) <= 1.0,
            extra=extra,
        ),
        Row(
            "cold start",
            "  the image's gunicorn CMD -> first 200 /readyz",
            "s",
            runs["gunicorn"],
            target="<= 1 s",
            met=statistics.median(runs["gunicorn"]) <= 1.0,
            extra=extra,
        ),
    ]


# ------------------------------------------------------------------------------ 5. scaling


def bench_scaling(repeats: int) -> list[Row]:
    from fhirbridge.pipeline import transform

    pack, iv, ov = pipeline_parts()
    now = datetime.now(UTC)
    per: dict[int, list[float]] = {10: [], 1000: []}
    ratios = []
    for n in range(repeats):
        for records in (10, 1000):
            doc = workload.wide(n, records)
            reps = max(1, 2000 // records)
            count = 0
            start = time.process_time()
            for _ in range(reps):
                count += len(
                    transform(
                        doc, pack=pack, input_validator=iv, output_validator=ov, now=now
                    ).resources
                )
            per[records].append((time.process_time() - start) / count * 1e6)
        ratios.append(per[1000][-1] / per[10][-1])
    ratio = statistics.median(ratios)
    return [
        Row("scaling", "per resource, submission of 10 records", "µs", per[10]),
        Row(
            "scaling",
            "per resource, submission of 1,000 records",
            "µs",
            per[1000],
            per[10],
            ratios,
            target="ratio <= 1.5",
            met=ratio <= 1.5,
        ),
    ]


class HighWater:
    """A child's peak RSS: VmHWM from /proc/<pid>/status, read every 20 ms while it runs.

    Not wait4's ru_maxrss: Linux carries the pre-exec memory image into it, so a child
    started by this process (which holds every queued resource) would be charged for the
    parent's memory at fork time (a /bin/true started from a 600 MB parent reports 611 MB).
    VmHWM belongs to the process's own image, from its exec on.
    """

    def __init__(self, proc: subprocess.Popen[Any]) -> None:
        self._status = Path(f"/proc/{proc.pid}/status")
        self._proc = proc
        self._kb = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            text = self._status.read_text()
        except OSError:
            return
        for line in text.splitlines():
            if line.startswith("VmHWM:"):
                self._kb = max(self._kb, int(line.split()[1]))

    def _watch(self) -> None:
        while not self._done.is_set() and self._proc.poll() is None:
            self._read()
            self._done.wait(0.02)

    def mb(self) -> float:
        """The peak so far (read once more now, when the process is still there)."""
        self._read()
        return self._kb / 1024.0

    def wait(self) -> float:
        """Wait for the process to end; its peak."""
        self._thread.join()
        self._proc.wait()
        self._done.set()
        if not self._kb:
            raise RuntimeError("no VmHWM read from /proc: the process ended at once")
        return self._kb / 1024.0


def bench_rss_map(submissions: int) -> list[Row]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "submissions.ndjson"
        with path.open("wb") as f:
            for i in range(submissions):
                f.write(orjson.dumps(workload.small(i)) + b"\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRBRIDGE_")}
        start = time.monotonic()
        proc = subprocess.Popen(
            [str(BIN / "fhirbridge"), "map", str(path)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        rss = HighWater(proc).wait()
        elapsed = time.monotonic() - start
    return [
        Row(
            "memory",
            f"fhirbridge map, NDJSON of {submissions:,} submissions",
            "MB peak RSS",
            [rss],
            target="<= 300 MB",
            met=rss <= 300,
            extra={"seconds": round(elapsed, 1)},
        )
    ]


def bench_rss_worker(resources: int) -> list[Row]:
    from sqlalchemy import func, select

    from fhirbridge.store.schema import delivery
    from tests.integration.fhir_server import FhirServer

    parts = pipeline_parts()
    submissions = max(1, -(-resources // 27))
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "db.sqlite"
        store, _outbox, bundles = _queued_store(
            db, [workload.medicine_session(i) for i in range(submissions)], parts
        )
        count = sum(len(b["entry"]) for b in bundles)
        server = FhirServer(Path(tmp) / "ehr")
        server.start()
        targets = Path(tmp) / "targets.yaml"
        targets.write_text(
            f"targets:\n  - name: ehr\n    base_url: {server.base_url}\n    profile: generic-r4\n"
        )
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("FHIRBRIDGE_")},
            "FHIRBRIDGE_DATABASE_URL": f"sqlite:///{db}",
            "FHIRBRIDGE_TARGETS": str(targets),
            "FHIRBRIDGE_WORKER_IDLE_SECONDS": "0.2",
        }
        start = time.monotonic()
        proc = subprocess.Popen(
            [str(BIN / "fhirbridge"), "worker"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        high_water = HighWater(proc)
        try:
            while True:
                time.sleep(1.0)
                with store.engine.connect() as conn:
                    left = conn.execute(
                        select(func.count())
                        .select_from(delivery)
                        .where(delivery.c.status.in_(("queued", "in_flight", "retrying")))
                    ).scalar_one()
                if not left or proc.poll() is not None:
                    break
            elapsed = time.monotonic() - start
            rss = high_water.mb()
            proc.send_signal(signal.SIGTERM)
            high_water.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
            store.close()
            server.close()
    return [
        Row(
            "memory",
            f"fhirbridge worker, queue of {count:,} resources",
            "MB peak RSS",
            [rss],
            target="<= 300 MB",
            met=rss <= 300,
            extra={"seconds_to_drain": round(elapsed, 1), "left": left},
        )
    ]


# ------------------------------------------------------------------------------ main

SECTIONS = ("pipeline", "api", "sync", "cold_start", "scaling", "memory")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (~2 min)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one run: tests only")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--worker-queue", type=int, default=None, help="resources queued for the worker's RSS"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "latest.json")
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    size = "smoke" if args.smoke else "quick" if args.quick else "full"
    repeats = args.repeats or {"smoke": 1, "quick": 3, "full": 5}[size]
    plan: dict[str, Callable[[], list[Row]]] = {
        "pipeline": lambda: bench_pipeline(repeats, {"smoke": 6, "quick": 60, "full": 150}[size]),
        "api": lambda: bench_api(repeats, {"smoke": 1.0, "quick": 5.0, "full": 10.0}[size]),
        "sync": lambda: [
            row
            for concurrency in (1, 2)
            for row in bench_sync(
                {"smoke": 1, "quick": 2, "full": 2}[size] if args.repeats is None else repeats,
                {"smoke": 60, "quick": 1000, "full": 5000}[size],
                concurrency,
            )
        ],
        "cold_start": lambda: bench_cold_start(repeats),
        "scaling": lambda: bench_scaling(repeats),
        "memory": lambda: (
            bench_rss_map({"smoke": 200, "quick": 10_000, "full": 100_000}[size])
            + bench_rss_worker(
                args.worker_queue or {"smoke": 60, "quick": 10_000, "full": 100_000}[size]
            )
        ),
    }
    info = machine()
    rows: list[Row] = []
    started = time.monotonic()
    for name in only:
        t0 = time.monotonic()
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        rows += plan[name]()
        print(f"[bench] {name}: {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    text = table(rows)
    print(
        f"\nmachine: {info['cpu']}, {info['cores']} cores, Python {info['python']}, "
        f"size {size}, {repeats} runs per figure\n"
    )
    print(text)
    report = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "size": size,
        "repeats": repeats,
        "seconds": round(time.monotonic() - started, 1),
        "machine": info,
        "rows": [r.to_dict() for r in rows],
        "table": text,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (args.out.parent / f"{stamp}-{size}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten: {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
