"""A closed-loop HTTP load generator for loopback benchmarks (stdlib only).

`run(url, bodies, ...)` starts `processes` processes of `threads` threads each; every thread
sends POSTs back to back (a new request as soon as the previous answer arrived) for
`seconds`, each with the next body of its own share of `bodies` (so no body is sent twice),
and records each request's latency. The result: requests, errors, requests/s, p50 and p99.

Processes, not only threads: one Python process with many threads would be limited by its
own GIL before the server is, and measure the generator instead of the server.
"""

from __future__ import annotations

import http.client
import multiprocessing as mp
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


@dataclass(frozen=True)
class LoadResult:
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "rps": round(self.rps, 1),
            "p50_ms": round(self.percentile(0.50), 2),
            "p99_ms": round(self.percentile(0.99), 2),
            "mean_ms": round(statistics.fmean(self.latencies_ms), 2) if self.latencies_ms else None,
        }


def _thread(
    host: str,
    port: int,
    path: str,
    headers: dict[str, str],
    bodies: list[bytes],
    deadline: float,
    ok_status: tuple[int, ...],
    out: list[tuple[float, bool]],
) -> None:
    conn = http.client.HTTPConnection(host, port, timeout=30)
    n = 0
    while time.perf_counter() < deadline and n < len(bodies):
        body = bodies[n]
        n += 1
        start = time.perf_counter()
        try:
            conn.request("POST", path, body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            ok = response.status in ok_status
            if response.getheader("connection", "").lower() == "close":
                conn.close()
        except (OSError, http.client.HTTPException):
            conn.close()
            ok = False
        out.append(((time.perf_counter() - start) * 1000.0, ok))
    conn.close()


def _process(
    url: str,
    headers: dict[str, str],
    shares: list[list[bytes]],
    start_at: float,
    seconds: float,
    ok_status: tuple[int, ...],
    queue: Any,
) -> None:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    # Every process starts at the same wall-clock instant, so the window is the same.
    time.sleep(max(0.0, start_at - time.time()))
    deadline = time.perf_counter() + seconds
    results: list[list[tuple[float, bool]]] = [[] for _ in shares]
    threads = [
        threading.Thread(
            target=_thread,
            args=(host, port, parts.path, headers, share, deadline, ok_status, results[i]),
        )
        for i, share in enumerate(shares)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    queue.put([item for r in results for item in r])


def run(
    url: str,
    bodies: list[bytes],
    *,
    seconds: float,
    processes: int = 2,
    threads: int = 2,
    headers: dict[str, str] | None = None,
    ok_status: tuple[int, ...] = (200, 201),
) -> LoadResult:
    """Drive POSTs at `url` for `seconds` from processes x threads connections."""
    headers = {"Content-Type": "application/json", **(headers or {})}
    connections = processes * threads
    shares = [bodies[i::connections] for i in range(connections)]
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    start_at = time.time() + 0.5
    procs = [
        ctx.Process(
            target=_process,
            args=(
                url,
                headers,
                shares[p * threads : (p + 1) * threads],
                start_at,
                seconds,
                ok_status,
                queue,
            ),
        )
        for p in range(processes)
    ]
    for p in procs:
        p.start()
    samples: list[tuple[float, bool]] = []
    for _ in procs:
        samples.extend(queue.get(timeout=seconds + 120))
    for p in procs:
        p.join()
    ok = [ms for ms, good in samples if good]
    return LoadResult(len(ok), len(samples) - len(ok), seconds, ok)
