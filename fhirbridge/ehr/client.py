"""HTTP to one hospital FHIR server; requests' exceptions and statuses become the EhrError tree.

    what happened                                      GET/HEAD        POST/PUT/PATCH/DELETE
    connect refused / timeout, DNS, TLS verify, proxy  TransientError  TransientError
    read timeout; connection dropped or body cut off   TransientError  OutcomeUnknownError
    2xx                                                EhrResponse     EhrResponse
    3xx (redirects are followed for reads only)        EhrResponse     RejectedError
    408, 429, 500, 503, other 5xx (with Retry-After)   TransientError  TransientError
    502, 504 (a gateway may have passed the write on)  TransientError  OutcomeUnknownError
    501 Not Implemented                                RejectedError   RejectedError
    409, 412                                           ConflictError   ConflictError
    other 4xx                                          RejectedError   RejectedError

Retries are the worker's decision (fhirbridge.sync.retry): the pooled session never retries.
Bodies are never logged; at DEBUG a line holds method, path without query, status and elapsed ms.
"""

from __future__ import annotations

import http
import logging
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, NamedTuple, Self
from urllib.parse import urljoin, urlsplit

import orjson
import requests
import requests.auth
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ClosedPoolError, MaxRetryError, NewConnectionError
from urllib3.exceptions import ProxyError as Urllib3ProxyError
from urllib3.exceptions import SSLError as Urllib3SSLError
from urllib3.util.retry import Retry

from fhirbridge.ehr.errors import (
    EMPTY_OUTCOME,
    ConflictError,
    EhrError,
    InvalidResponseError,
    OutcomeSummary,
    OutcomeUnknownError,
    RejectedError,
    SearchLimitError,
    TransientError,
    summarize_outcome,
)
from fhirbridge.sync.retry import parse_retry_after

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
FHIR_JSON_BODY = "application/fhir+json; charset=utf-8"
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# No transport retries at all: a read error on a write must surface as OutcomeUnknownError, and
# the worker's backoff (with Retry-After) is the only retry loop.
NO_RETRY = Retry(total=0, read=False, redirect=0, raise_on_redirect=False, raise_on_status=False)
MAX_REDIRECTS = 5

Params = Mapping[str, str | Sequence[str]] | Sequence[tuple[str, str]]

_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_RESOURCE_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")
_ETAG = re.compile(r'\s*(?:W/)?"([^"]*)"\s*')
_ENTRY_STATUS = re.compile(r"\s*([1-5][0-9]{2})\b")


class Location(NamedTuple):
    """Where a server put a resource: `Patient/123/_history/2` → ("Patient", "123", "2")."""

    resource_type: str
    id: str
    version_id: str | None


def parse_location(value: str | None) -> Location | None:
    """Type, id and version from a Location / Content-Location / entry.response.location."""
    if not value:
        return None
    parts = [p for p in urlsplit(value.strip()).path.split("/") if p]
    version: str | None = None
    if len(parts) >= 4 and parts[-2] == "_history":
        version = parts[-1]
        parts = parts[:-2]
    if len(parts) < 2:
        return None
    rtype, rid = parts[-2], parts[-1]
    if not (_RESOURCE_TYPE.fullmatch(rtype) and _FHIR_ID.fullmatch(rid)):
        return None
    if version is not None and not _FHIR_ID.fullmatch(version):
        return None
    return Location(rtype, rid, version)


def parse_etag(value: str | None) -> str | None:
    """The version in an ETag: `W/"3"` → "3"; None when absent or malformed."""
    if not value:
        return None
    match = _ETAG.fullmatch(value)
    return match.group(1) if match and match.group(1) else None


def _meta_version(body: Mapping[str, Any] | None) -> str | None:
    meta = body.get("meta") if body else None
    version = meta.get("versionId") if isinstance(meta, dict) else None
    return version if isinstance(version, str) else None


@dataclass(frozen=True, slots=True)
class EhrResponse:
    """A successful (2xx/3xx) answer; `body` is the JSON object, or None when there is none."""

    status: int
    headers: Mapping[str, str]
    body: dict[str, Any] | None

    @property
    def etag(self) -> str | None:
        return self.headers.get("ETag")

    @property
    def location(self) -> Location | None:
        return parse_location(self.headers.get("Location")) or parse_location(
            self.headers.get("Content-Location")
        )

    @property
    def version_id(self) -> str | None:
        """From the ETag, else the body's meta.versionId, else the Location's _history part."""
        version = parse_etag(self.etag) or _meta_version(self.body)
        if version is None and (where := self.location) is not None:
            version = where.version_id
        return version


@dataclass(frozen=True, slots=True)
class EntryResult:
    """One entry of a batch-response or transaction-response Bundle; `error` is None on success."""

    index: int
    status: int | None
    location: Location | None
    etag: str | None
    error: EhrError | None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def version_id(self) -> str | None:
        version = parse_etag(self.etag)
        if version is None and self.location is not None:
            version = self.location.version_id
        return version


def _phrase(status: int) -> str:
    # The standard phrase, never the server's: a reason phrase is free text.
    try:
        return f"{status} {http.HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


def status_error(
    status: int,
    where: str,
    *,
    write: bool,
    summary: OutcomeSummary = EMPTY_OUTCOME,
    retry_after: float | None = None,
) -> EhrError | None:
    """The error an HTTP status means for a request (`write`: may it have changed data?)."""
    if 200 <= status < 300 or (300 <= status < 400 and not write):
        return None
    message = f"{where}: {_phrase(status)}"
    if summary:
        message += f": {summary}"
    if status < 200:
        return InvalidResponseError(message, status=status, summary=summary)
    if 300 <= status < 400:
        message += " (redirects are not followed for writes)"
        return RejectedError(message, status=status, summary=summary)
    if write and status in (502, 504):
        return OutcomeUnknownError(message, status=status, summary=summary)
    if status in (408, 429) or (status >= 500 and status != 501):
        return TransientError(message, status=status, retry_after=retry_after, summary=summary)
    if status in (409, 412):
        return ConflictError(message, status=status, summary=summary)
    return RejectedError(message, status=status, summary=summary)


def _never_sent(exc: requests.RequestException) -> bool:
    """True when the connection was never set up, so no byte of the request left."""
    if isinstance(exc, requests.ConnectTimeout | requests.exceptions.ProxyError):
        return True
    reason: object = exc.args[0] if exc.args else None
    if isinstance(reason, MaxRetryError):
        reason = reason.reason
    if isinstance(reason, Urllib3SSLError | Urllib3ProxyError) and reason.args:
        reason = reason.args[0]
    return isinstance(reason, NewConnectionError | ssl.SSLCertVerificationError | ClosedPoolError)


_BAD_REQUEST = (
    requests.exceptions.InvalidURL,
    requests.exceptions.MissingSchema,
    requests.exceptions.InvalidSchema,
    requests.exceptions.InvalidHeader,
    requests.exceptions.URLRequired,
    requests.exceptions.InvalidJSONError,
)


@contextmanager
def _mapped_errors(method: str, where: str) -> Iterator[None]:
    """Re-raise requests' exceptions as the most specific EhrError, `from` the original."""
    write = method not in READ_METHODS
    try:
        yield
    except _BAD_REQUEST as exc:
        raise EhrError(f"{where}: request could not be built ({type(exc).__name__})") from exc
    except requests.TooManyRedirects as exc:
        raise InvalidResponseError(f"{where}: too many redirects") from exc
    except requests.RequestException as exc:
        if _never_sent(exc):
            raise TransientError(f"{where}: could not connect ({type(exc).__name__})") from exc
        what = "no answer within the read timeout"
        if not isinstance(exc, requests.ReadTimeout):
            what = f"connection lost ({type(exc).__name__})"
        if write:
            raise OutcomeUnknownError(f"{where}: request sent, {what}") from exc
        raise TransientError(f"{where}: {what}") from exc


# `EhrClient.on_sent`: what to call, on this thread, once the next request is on the wire.
_sent_hook = threading.local()


def _fire_sent_hook() -> None:
    hook: Callable[[], None] | None = getattr(_sent_hook, "fn", None)
    if hook is None:
        return
    _sent_hook.fn = None
    try:
        hook()
    except Exception as exc:  # the caller's business: never the request's
        log.warning("on_sent hook failed: %s", type(exc).__name__)


class _SentHookConnection(HTTPConnection):
    def getresponse(self) -> Any:  # the request is sent: now it waits for the answer
        _fire_sent_hook()
        return super().getresponse()


class _SentHookHTTPSConnection(HTTPSConnection):
    def getresponse(self) -> Any:
        _fire_sent_hook()
        return super().getresponse()


class _Pool(HTTPConnectionPool):
    ConnectionCls = _SentHookConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _SentHookHTTPSConnection


def _json_object(content: bytes) -> dict[str, Any] | None:
    if not content.strip():
        return None
    try:
        value = orjson.loads(content)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower(), 0)
    return parts.scheme.lower(), f"{(parts.hostname or '').lower()}:{port}"


class EhrClient:
    """One hospital FHIR server: a pooled session, FHIR JSON, errors mapped to the EhrError tree.

    The client mounts its own adapter (pool sizes, no retries) for `base_url`, also on a session
    passed in; it closes a session only if it created it. TLS verification cannot be turned off.
    """

    def __init__(
        self,
        base_url: str,
        *,
        session: requests.Session | None = None,
        auth: requests.auth.AuthBase | None = None,
        timeout: tuple[float, float] = (5, 30),
        verify: bool | str = True,
        pool_maxsize: int = 10,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        if verify is False:
            raise ValueError("TLS verification cannot be turned off; pass a CA bundle path")
        scheme = urlsplit(base_url).scheme.lower()
        if scheme not in ("http", "https"):
            raise ValueError("base_url must be an http(s) URL")
        self.base_url = base_url.rstrip("/") + "/"
        self.timeout = timeout
        self._verify = verify
        self._auth = auth
        self._clock = clock
        self._origin = _origin(self.base_url)
        self._owns_session = session is None
        self.session = session if session is not None else requests.Session()
        self.session.max_redirects = MAX_REDIRECTS
        self._adapter = HTTPAdapter(
            pool_connections=1, pool_maxsize=pool_maxsize, max_retries=NO_RETRY
        )
        # connections that tell `on_sent` when a request has gone out (pools are made lazily)
        self._adapter.poolmanager.pool_classes_by_scheme = {"http": _Pool, "https": _HTTPSPool}
        self._prefixes = [self.base_url] + (["https://", "http://"] if self._owns_session else [])
        for prefix in self._prefixes:
            self.session.mount(prefix, self._adapter)

    def close(self) -> None:
        """Release the connection pool (and the session, if the client created it)."""
        if self._owns_session:
            self.session.close()
        else:
            self.session.adapters.pop(self.base_url, None)
        self._adapter.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def on_sent(self, fn: Callable[[], None] | None) -> None:
        """Call `fn` once, on this thread, as soon as this thread's next request is on the wire
        (sent, its answer not read yet): work that can overlap the wait for the answer. Not
        called if that request fails before it is sent (e.g. the connection is refused) or
        goes through a proxy; None disarms it. An exception from `fn` is logged, not raised."""
        _sent_hook.fn = fn

    def url(self, path_or_url: str) -> str:
        """An absolute URL under the server's origin; ValueError for any other origin."""
        url = urljoin(self.base_url, path_or_url.lstrip("/"))
        if _origin(url) != self._origin:
            raise ValueError("URL is not on the FHIR server's origin")
        return url

    def request(
        self,
        method: str,
        path_or_url: str,
        *,
        json: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        params: Params | None = None,
    ) -> EhrResponse:
        """Send one request; a 2xx (or a 3xx on a read) is returned, anything else raised."""
        method = method.upper()
        url = self.url(path_or_url)
        path = urlsplit(url).path
        where = f"{method} {path}"
        write = method not in READ_METHODS
        sent_headers = {"Accept": FHIR_JSON}
        if write:
            # The id, version and status of a write are in Location/ETag (or a transaction's
            # entry.response): the server need not send every resource back, and a hospital's
            # copy of a patient's record need not cross the network twice.
            sent_headers["Prefer"] = "return=minimal"
        data: bytes | None = None
        if json is not None:
            data = orjson.dumps(json if isinstance(json, dict) else dict(json))
            sent_headers["Content-Type"] = FHIR_JSON_BODY
        sent_headers.update(headers or {})
        started = time.perf_counter()
        try:
            with _mapped_errors(method, where):
                resp = self.session.request(
                    method,
                    url,
                    params=params,
                    data=data,
                    headers=sent_headers,
                    auth=self._auth,
                    timeout=self.timeout,
                    verify=self._verify,
                    allow_redirects=not write,
                )
        except EhrError as err:
            elapsed = (time.perf_counter() - started) * 1000
            log.debug("%s %s failed (%s) in %.0f ms", method, path, err.code, elapsed)
            raise
        elapsed = (time.perf_counter() - started) * 1000
        log.debug("%s %s %d in %.0f ms", method, path, resp.status_code, elapsed)
        body = _json_object(resp.content)
        error = status_error(
            resp.status_code,
            where,
            write=write,
            summary=summarize_outcome(body),
            retry_after=parse_retry_after(resp.headers.get("Retry-After"), self._clock()),
        )
        if error is not None:
            raise error
        return EhrResponse(resp.status_code, resp.headers, body)

    def read(self, resource_type: str, resource_id: str) -> EhrResponse:
        """GET [type]/[id]; the body is the resource."""
        resp = self.request("GET", _resource_path(resource_type, resource_id))
        _expect(resp, resource_type, f"GET {resource_type}")
        return resp

    def search(
        self, resource_type: str, params: Params, max_pages: int = 20
    ) -> list[dict[str, Any]]:
        """The matching resources of a search, following `next` links for at most `max_pages`.

        Only entries with search.mode "match" (or none) are returned, not includes or outcomes.
        """
        _check_type(resource_type)
        if max_pages < 1:
            raise ValueError("max_pages must be >= 1")
        where = f"GET {resource_type}"
        found: list[dict[str, Any]] = []
        resp = self.request("GET", resource_type, params=params)
        for page in range(1, max_pages + 1):
            bundle = _expect(resp, "Bundle", where)
            for entry in _entries(bundle):
                search = entry.get("search")
                mode = search.get("mode", "match") if isinstance(search, dict) else "match"
                resource = entry.get("resource")
                if mode == "match" and isinstance(resource, dict):
                    found.append(resource)
            link = _next_link(bundle)
            if link is None:
                return found
            if page == max_pages:
                break
            try:
                next_url = self.url(link)
            except ValueError as exc:
                raise InvalidResponseError(f"{where}: next link leaves the server") from exc
            resp = self.request("GET", next_url)
        raise SearchLimitError(f"{where}: more than {max_pages} pages")

    def put(self, resource: Mapping[str, Any], if_match: str | None = None) -> EhrResponse:
        """PUT [type]/[id] (update, or create at our id); `if_match` is a version or an ETag."""
        path = _resource_path(resource.get("resourceType"), resource.get("id"))
        headers = {}
        if if_match is not None:
            headers["If-Match"] = (
                if_match if if_match.startswith(("W/", '"')) else f'W/"{if_match}"'
            )
        return self.request("PUT", path, json=resource, headers=headers)

    def create(self, resource: Mapping[str, Any], if_none_exist: str | None = None) -> EhrResponse:
        """POST [type]; `if_none_exist` (a query: `identifier=sys|val`) makes it conditional."""
        path = _check_type(resource.get("resourceType"))
        headers = {"If-None-Exist": if_none_exist} if if_none_exist else {}
        return self.request("POST", path, json=resource, headers=headers)

    def transaction(self, bundle: Mapping[str, Any]) -> EhrResponse:
        """POST a transaction Bundle; its entries all succeed or none does."""
        return self._bundle(bundle, "transaction")

    def batch(self, bundle: Mapping[str, Any]) -> EhrResponse:
        """POST a batch Bundle; check every entry with entry_results(resp.body)."""
        return self._bundle(bundle, "batch")

    def capabilities(self) -> dict[str, Any]:
        """GET metadata: the server's CapabilityStatement."""
        return _expect(self.request("GET", "metadata"), "CapabilityStatement", "GET metadata")

    def _bundle(self, bundle: Mapping[str, Any], kind: str) -> EhrResponse:
        if bundle.get("resourceType") != "Bundle" or bundle.get("type") != kind:
            raise ValueError(f"expected a Bundle of type {kind}")
        resp = self.request("POST", "", json=bundle)
        # The server took the write but its answer cannot be read: the outcome is unknown.
        body = resp.body or {}
        sent = bundle.get("entry")
        if (
            body.get("resourceType") != "Bundle"
            or body.get("type") != f"{kind}-response"
            or len(_entries(body)) != (len(sent) if isinstance(sent, list) else 0)
        ):
            raise OutcomeUnknownError(
                f"POST {urlsplit(self.base_url).path}: {resp.status} "
                f"but no matching {kind}-response Bundle",
                status=resp.status,
            )
        return resp


def _check_type(resource_type: object) -> str:
    if not (isinstance(resource_type, str) and _RESOURCE_TYPE.fullmatch(resource_type)):
        raise ValueError("not a FHIR resource type")
    return resource_type


def _resource_path(resource_type: object, resource_id: object) -> str:
    if not (isinstance(resource_id, str) and _FHIR_ID.fullmatch(resource_id)):
        raise ValueError("not a FHIR id")
    return f"{_check_type(resource_type)}/{resource_id}"


def _expect(resp: EhrResponse, resource_type: str, where: str) -> dict[str, Any]:
    if resp.body is None or resp.body.get("resourceType") != resource_type:
        raise InvalidResponseError(f"{where}: {resp.status} without a {resource_type}")
    return resp.body


def _entries(bundle: Mapping[str, Any]) -> list[dict[str, Any]]:
    entries = bundle.get("entry")
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def _next_link(bundle: Mapping[str, Any]) -> str | None:
    links = bundle.get("link")
    for link in links if isinstance(links, list) else ():
        if isinstance(link, dict) and link.get("relation") == "next":
            url = link.get("url")
            return url if isinstance(url, str) and url else None
    return None


def entry_results(response_bundle: Mapping[str, Any]) -> list[EntryResult]:
    """Per-entry outcomes of a batch/transaction response: a 200 on the Bundle does not mean
    every entry succeeded. An entry without a readable status has an unknown outcome."""
    results: list[EntryResult] = []
    for index, entry in enumerate(_entries(response_bundle)):
        raw = entry.get("response")
        response = raw if isinstance(raw, dict) else {}
        where = f"entry {index}"
        status_text = response.get("status")
        match = _ENTRY_STATUS.match(status_text) if isinstance(status_text, str) else None
        status = int(match.group(1)) if match else None
        location = parse_location(_str(response.get("location")))
        etag = _str(response.get("etag"))
        outcome = response.get("outcome")
        if outcome is None and isinstance(entry.get("resource"), dict):
            outcome = entry["resource"]
        error: EhrError | None
        if status is None:
            error = OutcomeUnknownError(f"{where}: no response status")
        else:
            error = status_error(status, where, write=False, summary=summarize_outcome(outcome))
        results.append(EntryResult(index, status, location, etag, error))
    return results


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None
