"""A small fault-injecting HTTP proxy for integration tests of FHIR clients.

``FaultProxy(upstream_base_url)`` listens on 127.0.0.1:<free port> and forwards every request to
the upstream server (one fresh ``http.client`` connection per request), except that requests
matching a queued ``Fault`` get that fault instead. ``base_url`` has the upstream's path layout
(``http://127.0.0.1:<proxy port>/fhir`` for ``http://127.0.0.1:<upstream port>/fhir``).

Faults are consumed in order: each request takes the *first* queued fault that matches its method
and path (``times`` requests each, 1 by default); requests that match none pass through untouched.

=========================  ==================================================================
kind                       what the client sees
=========================  ==================================================================
``status``                 ``status`` (503 by default) with an OperationOutcome body (or
                           ``body``), ``Retry-After: <retry_after>`` when set; NOT forwarded.
``hang``                   nothing: the connection is held open without an answer for
                           ``seconds`` (or until the client gives up, or ``close()``), then
                           closed. NOT forwarded: the client must time out.
``reset``                  the connection is reset (RST) without an answer; NOT forwarded.
``after_upstream_timeout`` the request IS forwarded (so the write happens upstream), then the
                           answer is withheld like ``hang``: "the create timed out but
                           succeeded".
``batch_entry_status``     forwarded; in the Bundle answer, entry ``entry_index`` gets
                           ``response.status`` "<status> <reason>" (e.g. "500 Internal Server
                           Error") and an OperationOutcome instead of its resource (or in
                           ``response.outcome`` with ``outcome_in="response.outcome"``, which is
                           where sekmet itself puts per-entry errors). The write of that entry
                           still happened upstream.
=========================  ==================================================================

Pass-through keeps the upstream status, headers (ETag, Location, Content-Type, Last-Modified,
Date, ...) and body byte for byte; only hop-by-hop headers are dropped and Content-Length is
recomputed. Absolute URLs inside answers (Location, Bundle links, fullUrl) still name the
upstream, as a real reverse proxy that does not rewrite would. If the upstream is down the proxy
answers 502 (connection refused/reset) or 504 (upstream timeout) with an OperationOutcome.

Bounded: every hang ends after ``seconds`` at the latest, idle client connections are dropped
after ``IDLE_TIMEOUT``, and ``close()`` wakes every held connection, shuts every client socket
and joins every thread (RuntimeError if one does not end within ``CLOSE_TIMEOUT``).
"""

from __future__ import annotations

import contextlib
import copy
import http.client
import json
import select
import socket
import socketserver
import struct
import threading
import time
from dataclasses import KW_ONLY, dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import urlsplit

FaultKind = Literal["status", "hang", "reset", "after_upstream_timeout", "batch_entry_status"]
FAULT_KINDS: tuple[FaultKind, ...] = (
    "status",
    "hang",
    "reset",
    "after_upstream_timeout",
    "batch_entry_status",
)
HOST = "127.0.0.1"
UPSTREAM_TIMEOUT = 30.0  # seconds for one forwarded exchange
IDLE_TIMEOUT = 30.0  # an idle keep-alive client connection is dropped after this
CLOSE_TIMEOUT = 10.0  # close() waits at most this long for the handler threads
MAX_BODY = 64 * 1024 * 1024
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
FHIR_JSON = "application/fhir+json; charset=utf-8"


@dataclass
class Fault:
    """One programmed fault; see the module docstring for what each ``kind`` does."""

    kind: FaultKind
    _: KW_ONLY
    match_method: str | None = None  # e.g. "POST"; None matches any method
    # a prefix of the request target (path + query). Absolute ("/fhir/Patient") or relative to the
    # upstream base path ("Patient" -> "/fhir/Patient"); None matches any path.
    match_path_prefix: str | None = None
    status: int = 503
    retry_after: str | None = None
    body: dict[str, Any] | None = (
        None  # "status": response body; "batch_entry_status": the entry OO
    )
    entry_index: int = 0
    outcome_in: Literal["resource", "response.outcome"] = "resource"
    seconds: float = 30
    times: int = 1  # how many matching requests this fault applies to

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {FAULT_KINDS}")
        if self.times < 1:
            raise ValueError("times must be >= 1")
        if self.seconds < 0:
            raise ValueError("seconds must be >= 0")

    def matches(self, method: str, target: str, base_path: str) -> bool:
        if self.match_method is not None and self.match_method.upper() != method.upper():
            return False
        if self.match_path_prefix is None:
            return True
        prefix = self.match_path_prefix
        if not prefix.startswith("/"):
            prefix = f"{base_path.rstrip('/')}/{prefix}"
        return target.startswith(prefix)


def operation_outcome(status: int, diagnostics: str) -> dict[str, Any]:
    code = {429: "throttled", 408: "timeout", 504: "timeout"}.get(status, "transient")
    if 400 <= status < 500 and status not in (408, 429):
        code = "processing"
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}],
    }


def status_text(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


@dataclass
class _Upstream:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # FaultProxy.close() joins the threads itself, with a deadline

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        super().__init__((HOST, 0), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would resolve the host name (getfqdn): not needed on loopback
        socketserver.TCPServer.server_bind(self)
        self.server_name = HOST
        self.server_port = self.server_address[1]

    def process_request(self, request: Any, client_address: Any) -> None:
        t = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name=f"fault-proxy-{client_address[1]}",
            daemon=True,
        )
        self.proxy._track_thread(t)
        t.start()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # never print from a handler thread; keep the error for inspection
        import traceback

        self.proxy._record_error(traceback.format_exc())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like a real server
    timeout = IDLE_TIMEOUT
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.proxy._track_conn(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.proxy._track_conn(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._proxy()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    # ---------------- request handling ----------------

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            total = 0
            while True:
                size = int(self.rfile.readline(1024).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024).strip():  # trailers
                        pass
                    return b"".join(chunks)
                total += size
                if total > MAX_BODY:
                    raise ValueError("request body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline(8)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ValueError("request body too large")
        return self.rfile.read(length) if length > 0 else b""

    def _proxy(self) -> None:
        proxy = self.server.proxy
        method, target = self.command, self.path
        body = self._read_body()
        fault = proxy._take_fault(method, target)
        if fault is None:
            self._forward_and_answer(body, None)
            return
        if fault.kind == "status":
            self._answer_status(fault)
        elif fault.kind == "hang":
            self._hold(fault.seconds)
        elif fault.kind == "reset":
            self._reset()
        elif fault.kind == "after_upstream_timeout":
            self._forward(body)
            self._hold(fault.seconds)
        else:  # batch_entry_status
            self._forward_and_answer(body, fault)

    def _forward(self, body: bytes, identity: bool = False) -> _Upstream:
        proxy = self.server.proxy
        headers = {
            k: v
            for k, v in self.headers.items()
            if k.lower() not in HOP_BY_HOP and k.lower() not in ("host", "content-length")
        }
        if identity:
            headers = {k: v for k, v in headers.items() if k.lower() != "accept-encoding"}
        headers["Host"] = proxy.upstream_netloc
        if body or self.command in ("POST", "PUT", "PATCH"):
            headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(
            proxy.upstream_host, proxy.upstream_port, timeout=proxy.upstream_timeout
        )
        try:
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            return _Upstream(resp.status, resp.reason, resp.getheaders(), data)
        except TimeoutError as e:
            return self._gateway_error(504, f"upstream timed out: {e}")
        except OSError as e:
            return self._gateway_error(502, f"upstream unreachable: {e}")
        except http.client.HTTPException as e:
            return self._gateway_error(502, f"bad upstream answer: {e!r}")
        finally:
            conn.close()

    @staticmethod
    def _gateway_error(status: int, diagnostics: str) -> _Upstream:
        body = json.dumps(operation_outcome(status, f"fault_proxy: {diagnostics}")).encode()
        return _Upstream(status, HTTPStatus(status).phrase, [("Content-Type", FHIR_JSON)], body)

    def _forward_and_answer(self, body: bytes, fault: Fault | None) -> None:
        up = self._forward(body, identity=fault is not None)
        data = up.body
        if fault is not None and up.status < 300:
            data = _rewrite_entry(data, fault)
        self.send_response_only(up.status, up.reason)
        for k, v in up.headers:
            if k.lower() in HOP_BY_HOP or k.lower() == "content-length":
                continue
            self.send_header(k, v)
        if self.command == "HEAD":
            length = next((v for k, v in up.headers if k.lower() == "content-length"), "0")
            self.send_header("Content-Length", length)
        else:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD" and data:
            self.wfile.write(data)

    def _answer_status(self, fault: Fault) -> None:
        payload = fault.body or operation_outcome(
            fault.status, f"fault_proxy: injected {status_text(fault.status)}"
        )
        data = json.dumps(payload).encode()
        self.send_response(fault.status)
        self.send_header("Content-Type", FHIR_JSON)
        if fault.retry_after is not None:
            self.send_header("Retry-After", fault.retry_after)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _hold(self, seconds: float) -> None:
        """Answer nothing for ``seconds`` (less if the client hangs up or the proxy closes)."""
        proxy = self.server.proxy
        deadline = time.monotonic() + seconds
        while not proxy._closing.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                readable, _, _ = select.select([self.connection], [], [], min(left, 0.05))
                if readable and self.connection.recv(1, socket.MSG_PEEK) == b"":
                    break  # the client gave up and closed its end
                if readable:
                    proxy._closing.wait(min(left, 0.05))  # pipelined bytes: do not spin
            except (OSError, ValueError):
                break
        self.close_connection = True

    def _reset(self) -> None:
        """Drop the connection with a TCP RST, without answering."""
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.server.proxy._track_conn(self.connection, False)
        with contextlib.suppress(OSError):
            self.connection.close()


def _rewrite_entry(data: bytes, fault: Fault) -> bytes:
    try:
        bundle = json.loads(data)
    except ValueError:
        return data
    entries = bundle.get("entry") if isinstance(bundle, dict) else None
    if not isinstance(entries, list) or not 0 <= fault.entry_index < len(entries):
        return data
    outcome = copy.deepcopy(fault.body) or operation_outcome(
        fault.status,
        f"fault_proxy: injected {status_text(fault.status)} for entry {fault.entry_index}",
    )
    response: dict[str, Any] = {"status": status_text(fault.status)}
    entry: dict[str, Any] = {"response": response}
    if fault.outcome_in == "resource":
        entry["resource"] = outcome
    else:
        response["outcome"] = outcome
    entries[fault.entry_index] = entry
    return json.dumps(bundle, separators=(",", ":")).encode()


class FaultProxy:
    """A fault-injecting reverse proxy on 127.0.0.1 in front of ``upstream_base_url``."""

    def __init__(self, upstream_base_url: str, upstream_timeout: float = UPSTREAM_TIMEOUT) -> None:
        parts = urlsplit(upstream_base_url.rstrip("/"))
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"upstream must be an http:// URL, got {upstream_base_url!r}")
        self.upstream_base_url = upstream_base_url.rstrip("/")
        self.upstream_host: str = parts.hostname
        self.upstream_port: int = parts.port or 80
        self.upstream_netloc = parts.netloc
        self.upstream_timeout = upstream_timeout
        self.base_path = parts.path
        self._lock = threading.Lock()
        self._faults: list[tuple[Fault, list[int]]] = []  # (fault, [remaining uses])
        self._seen: list[tuple[str, str]] = []
        self._applied: list[tuple[str, str, str]] = []
        self._errors: list[str] = []
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()
        self._closing = threading.Event()
        self._closed = False
        self._server = _Server(self)
        self.port: int = self._server.server_address[1]
        self.base_url = f"http://{HOST}:{self.port}{self.base_path}"
        self._serve_thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fault-proxy-serve",
            daemon=True,
        )
        self._serve_thread.start()

    # ---------------- programming faults ----------------

    def push(self, fault: Fault) -> None:
        """Queue a fault; requests consume the first queued fault that matches them."""
        with self._lock:
            self._faults.append((fault, [fault.times]))

    def clear(self) -> None:
        """Drop all queued faults."""
        with self._lock:
            self._faults.clear()

    @property
    def pending(self) -> list[Fault]:
        """Faults not (fully) consumed yet."""
        with self._lock:
            return [f for f, _ in self._faults]

    @property
    def requests_seen(self) -> list[tuple[str, str]]:
        """(method, path with query) of every request received, in arrival order (a copy)."""
        with self._lock:
            return list(self._seen)

    @property
    def faults_applied(self) -> list[tuple[str, str, str]]:
        """(kind, method, path) of every fault applied, in order (a copy)."""
        with self._lock:
            return list(self._applied)

    @property
    def errors(self) -> list[str]:
        """Tracebacks of unexpected handler errors (should stay empty)."""
        with self._lock:
            return list(self._errors)

    def _take_fault(self, method: str, target: str) -> Fault | None:
        with self._lock:
            self._seen.append((method, target))
            for i, (fault, left) in enumerate(self._faults):
                if fault.matches(method, target, self.base_path):
                    left[0] -= 1
                    if left[0] <= 0:
                        del self._faults[i]
                    self._applied.append((fault.kind, method, target))
                    return fault
        return None

    # ---------------- bookkeeping for bounded shutdown ----------------

    def _track_thread(self, t: threading.Thread) -> None:
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)

    def _track_conn(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    def _record_error(self, text: str) -> None:
        with self._lock:
            self._errors.append(text)

    def close(self) -> None:
        """Stop serving, wake held connections, drop client sockets, join every thread."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        self._server.shutdown()
        self._serve_thread.join(CLOSE_TIMEOUT)
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + CLOSE_TIMEOUT
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._server.server_close()
        alive = [t.name for t in threads if t.is_alive()]
        if alive or self._serve_thread.is_alive():
            raise RuntimeError(f"fault proxy threads still alive after close(): {alive}")

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<FaultProxy {self.base_url} -> {self.upstream_base_url}>"
