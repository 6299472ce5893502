"""FHIR R4 read API under /fhir: capabilities, read, vread, history, search, Patient/$everything.

    GET  /fhir/metadata                      CapabilityStatement (from the parameter table)
    GET  /fhir/{type}/{id}                   read (ETag W/"vid", Last-Modified, 304)
    GET  /fhir/{type}/{id}/_history          history Bundle, newest first
    GET  /fhir/{type}/{id}/_history/{vid}    vread
    GET  /fhir/{type}?…                      search: searchset Bundle, offset paging
    POST /fhir/{type}/_search                the same, form-encoded body
    GET  /fhir/Patient/{id}/$everything      searchset Bundle

Responses are application/fhir+json; charset=utf-8. Stored resources are served as the exact
JSON the store holds (spliced into Bundles with orjson.Fragment, never re-serialized).
Search: unknown parameters are ignored (and left out of the self link) unless the request says
`Prefer: handling=strict`; malformed values are a 400 OperationOutcome naming the parameter and
never quoting the value. Every error is a fhirbridge.errors exception → OperationOutcome.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any
from urllib.parse import urlencode

import orjson
from flask import Blueprint, Flask, Response, current_app, request
from werkzeug.datastructures import MIMEAccept
from werkzeug.http import parse_accept_header

from fhirbridge import audit
from fhirbridge.api.access import FHIR_READ, SYNC_ADMIN, public, requires
from fhirbridge.api.body import read_form
from fhirbridge.api.http import FHIR_JSON, services
from fhirbridge.errors import (
    BadRequestError,
    FhirbridgeError,
    Issue,
    NotFoundError,
    UnsupportedMediaTypeError,
)
from fhirbridge.store.fhirdates import format_instant, micros, micros_to_datetime, parse_range
from fhirbridge.store.query import SearchQuery, parse_search
from fhirbridge.store.resources import StoredVersion
from fhirbridge.store.search_params import (
    COMMON_PARAMS,
    ID_RE,
    PARAMS,
    SUPPORTED_TYPES,
    SearchParam,
)

__all__ = ["NotAcceptableError", "bp", "capability_statement", "init_app"]

# The audit trail is for ops, not for every reader of clinical data.
AUDIT = {"AuditEvent": SYNC_ADMIN}
# $everything answers fhir.read callers: never with a type that needs more than fhir.read.
_EVERYTHING_TYPES = frozenset(PARAMS) - AUDIT.keys()

bp = Blueprint("fhir", __name__, url_prefix="/fhir")

FHIR_JSON_UTF8 = f"{FHIR_JSON}; charset=utf-8"
# app.extensions key: a list of CapabilityStatement.rest.resource entries added by other blueprints
CAPABILITY_EXTENSIONS = "fhirbridge.capability_resources"
FHIR_VERSION = "4.0.1"
EVERYTHING_DEFINITION = "http://hl7.org/fhir/OperationDefinition/Patient-everything"
_JSON_MIMETYPES = frozenset({FHIR_JSON, "application/json", "application/json+fhir"})
# `_format` values meaning JSON; "+" arrives as " " when a client does not percent-encode it.
_JSON_FORMATS = frozenset(
    {"json", *_JSON_MIMETYPES, "application/fhir json", "application/json fhir"}
)
_ACCEPT_ANY = frozenset({"*/*", "application/*"})
_RESERVED = ("_format", "_pretty")
_EVERYTHING_PARAMS = frozenset({"_type", "_since", *_RESERVED})
_VID_RE = re.compile(r"[0-9]{1,9}", re.ASCII)
_STARTED = datetime.now(UTC)


class NotAcceptableError(FhirbridgeError):
    """Not acceptable: this server produces application/fhir+json only."""

    code = "not_acceptable"
    http_status = 406
    issue_code = "not-supported"


def init_app(app: Flask) -> None:
    """Register the /fhir blueprint (and the charset of its responses, routing errors too)."""
    app.register_blueprint(bp)
    app.after_request(_finish)


# ---------------------------------------------------------------- negotiation and responses


def _wants_json(accept: str) -> bool:
    parsed = parse_accept_header(accept, MIMEAccept)
    if not parsed:
        return True  # unparseable: be lenient
    for value, quality in parsed:
        mimetype = value.split(";", 1)[0].strip().lower()
        if quality > 0 and (mimetype in _JSON_MIMETYPES or mimetype in _ACCEPT_ANY):
            return True
    return False


@bp.before_request
def _negotiate() -> None:
    fmt = request.args.get("_format")
    if fmt is not None:
        if fmt.split(";", 1)[0].strip().lower() not in _JSON_FORMATS:
            raise NotAcceptableError("unsupported _format: this server produces JSON only")
        return
    accept = request.headers.get("Accept")
    if accept and not _wants_json(accept):
        raise NotAcceptableError()


def _finish(response: Response) -> Response:
    prefix = bp.url_prefix or ""
    if response.mimetype == FHIR_JSON and (request.path + "/").startswith(prefix + "/"):
        if (
            request.args.get("_pretty") == "true"
            and response.status_code == 200
            and not response.is_streamed
        ):
            body = orjson.loads(response.get_data())
            response.set_data(orjson.dumps(body, option=orjson.OPT_INDENT_2))
        response.content_type = FHIR_JSON_UTF8
    return response


def _fhir(body: bytes | str, status: int = 200) -> Response:
    return Response(body, status=status, content_type=FHIR_JSON_UTF8)


def _base_url() -> str:
    configured = services().settings.base_url
    if configured:
        return configured.rstrip("/")
    return request.url_root.rstrip("/") + (bp.url_prefix or "")


def _strict() -> bool:
    for preference in request.headers.get("Prefer", "").split(","):
        key, _, value = preference.split(";", 1)[0].partition("=")
        if key.strip().lower() == "handling" and value.strip().strip('"').lower() == "strict":
            return True
    return False


def _check_type(rtype: str) -> None:
    if rtype not in PARAMS:
        raise NotFoundError(
            "unsupported resource type",
            [Issue("this server does not serve that resource type", code="not-supported")],
        )


def _check_id(rid: str) -> None:
    if ID_RE.fullmatch(rid) is None:
        raise NotFoundError("resource not found")


def _instant_now() -> str:
    return format_instant(micros(datetime.now(UTC)))


# ---------------------------------------------------------------- metadata


def _search_param(sp: SearchParam) -> dict[str, Any]:
    out: dict[str, Any] = {"name": sp.name}
    if sp.definition:
        out["definition"] = sp.definition
    out["type"] = sp.type
    out["documentation"] = sp.documentation
    return out


def capability_statement(
    base_url: str, extra_resources: Sequence[dict[str, Any]] = ()
) -> dict[str, Any]:
    """What this server does, derived from the same parameter table the store indexes.

    `extra_resources`: rest.resource entries other blueprints serve under /fhir (ConceptMap).
    """
    try:
        software_version = version("fhirbridge")
    except PackageNotFoundError:  # pragma: no cover - running from an uninstalled tree
        software_version = "0+unknown"
    resources: list[dict[str, Any]] = []
    for rtype in SUPPORTED_TYPES:
        entry: dict[str, Any] = {
            "type": rtype,
            "interaction": [
                {"code": "read"},
                {"code": "vread"},
                {"code": "history-instance"},
                {"code": "search-type"},
            ],
            "versioning": "versioned",
            "readHistory": True,
            "conditionalRead": "full-support",
            "searchParam": [_search_param(sp) for sp in (*COMMON_PARAMS, *PARAMS[rtype])],
        }
        if rtype == "Patient":
            entry["operation"] = [{"name": "everything", "definition": EVERYTHING_DEFINITION}]
        resources.append(entry)
    resources.extend(extra_resources)
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": format_instant(micros(_STARTED)),
        "publisher": "fhirbridge",
        "kind": "instance",
        "software": {"name": "fhirbridge", "version": software_version},
        "implementation": {"description": "fhirbridge FHIR R4 read API", "url": base_url},
        "fhirVersion": FHIR_VERSION,
        "format": ["json", FHIR_JSON],
        "rest": [
            {
                "mode": "server",
                "documentation": (
                    "Read-only. Search: unknown parameters are ignored unless "
                    "'Prefer: handling=strict'; paging with _count and _offset; _sort on _id, "
                    "_lastUpdated and the date parameters. Date values without an offset are UTC."
                ),
                "resource": resources,
            }
        ],
    }


@bp.get("/metadata")
@public
def metadata() -> Response:
    """GET /fhir/metadata."""
    extra = current_app.extensions.get(CAPABILITY_EXTENSIONS, ())
    return _fhir(orjson.dumps(capability_statement(_base_url(), extra)))


# ---------------------------------------------------------------- read, vread, history


def _resource_response(stored: StoredVersion) -> Response:
    assert stored.json is not None
    audit.note([stored])
    response = _fhir(stored.json)
    response.set_etag(stored.version_id, weak=True)
    response.last_modified = stored.last_modified
    response.headers["Content-Location"] = (
        f"{_base_url()}/{stored.resource_type}/{stored.id}/_history/{stored.version_id}"
    )
    response.make_conditional(request)
    return response


@bp.get("/<rtype>/<rid>")
@requires(FHIR_READ, by_type=AUDIT)
@audit.audited("read", "R")
def read(rtype: str, rid: str) -> Response:
    """GET /fhir/{type}/{id}: the current version; 304 when If-None-Match matches."""
    _check_type(rtype)
    _check_id(rid)
    return _resource_response(services().store.read_stored(rtype, rid))


@bp.get("/<rtype>/<rid>/_history/<vid>")
@requires(FHIR_READ, by_type=AUDIT)
@audit.audited("vread", "R")
def vread(rtype: str, rid: str, vid: str) -> Response:
    """GET /fhir/{type}/{id}/_history/{vid}."""
    _check_type(rtype)
    _check_id(rid)
    if _VID_RE.fullmatch(vid) is None:
        raise NotFoundError("version not found")
    return _resource_response(services().store.vread_stored(rtype, rid, vid))


_HISTORY_STATUS = {"created": ("PUT", "201 Created"), "updated": ("PUT", "200 OK")}


@bp.get("/<rtype>/<rid>/_history")
@requires(FHIR_READ, by_type=AUDIT)
@audit.audited("history-instance", "R")
def history(rtype: str, rid: str) -> Response:
    """GET /fhir/{type}/{id}/_history: a history Bundle, newest version first."""
    _check_type(rtype)
    _check_id(rid)
    versions = services().store.history_stored(rtype, rid)
    audit.note(v for v in versions if v.json is not None)
    base = _base_url()
    entries: list[dict[str, Any]] = []
    for v in versions:
        method, status = _HISTORY_STATUS.get(v.outcome or "", ("DELETE", "204 No Content"))
        entry: dict[str, Any] = {"fullUrl": f"{base}/{rtype}/{rid}"}
        if v.json is not None:
            entry["resource"] = orjson.Fragment(v.json)
        entry["request"] = {"method": method, "url": f"{rtype}/{rid}"}
        entry["response"] = {
            "status": status,
            "etag": f'W/"{v.version_id}"',
            "lastModified": v.last_updated,
        }
        entries.append(entry)
    bundle = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"lastUpdated": _instant_now()},
        "type": "history",
        "total": len(entries),
        "link": [{"relation": "self", "url": f"{base}/{rtype}/{rid}/_history"}],
        "entry": entries,
    }
    return _fhir(orjson.dumps(bundle))


# ---------------------------------------------------------------- search


def _link(base: str, rtype: str, params: list[tuple[str, str]]) -> str:
    return f"{base}/{rtype}?{urlencode(params)}" if params else f"{base}/{rtype}"


def _searchset(
    base: str,
    links: list[dict[str, str]],
    total: int,
    matches: tuple[StoredVersion, ...],
    included: tuple[StoredVersion, ...] = (),
) -> bytes:
    entries = [
        {
            "fullUrl": f"{base}/{v.resource_type}/{v.id}",
            "resource": orjson.Fragment(v.json or "{}"),
            "search": {"mode": mode},
        }
        for mode, group in (("match", matches), ("include", included))
        for v in group
    ]
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"lastUpdated": _instant_now()},
        "type": "searchset",
        "total": total,
        "link": links,
    }
    if entries:
        bundle["entry"] = entries
    return orjson.dumps(bundle)


def _paging_links(base: str, rtype: str, query: SearchQuery, total: int) -> list[dict[str, str]]:
    links = [{"relation": "self", "url": _link(base, rtype, query.link_params())}]
    count = query.count
    if count == 0:
        return links
    last = ((total - 1) // count) * count if total else 0
    links.append({"relation": "first", "url": _link(base, rtype, query.link_params(0))})
    if query.offset > 0:
        previous = min(max(query.offset - count, 0), last)
        links.append(
            {"relation": "previous", "url": _link(base, rtype, query.link_params(previous))}
        )
    if query.offset + count < total:
        links.append(
            {"relation": "next", "url": _link(base, rtype, query.link_params(query.offset + count))}
        )
    links.append({"relation": "last", "url": _link(base, rtype, query.link_params(last))})
    return links


def _search(rtype: str, items: list[tuple[str, str]]) -> Response:
    _check_type(rtype)
    settings = services().settings
    query = parse_search(
        rtype,
        items,
        strict=_strict(),
        default_count=settings.page_size,
        max_count=settings.max_page_size,
        reserved=_RESERVED,
    )
    page = services().store.search(rtype, query)
    audit.note(
        page.entries, query_type=rtype, parameters=(n for n, _ in query.used), total=page.total
    )
    base = _base_url()
    links = _paging_links(base, rtype, query, page.total)
    return _fhir(_searchset(base, links, page.total, page.entries))


@bp.get("/<rtype>")
@requires(FHIR_READ, by_type=AUDIT)
@audit.audited("search-type", "E")
def search(rtype: str) -> Response:
    """GET /fhir/{type}?params: a searchset Bundle."""
    return _search(rtype, list(request.args.items(multi=True)))


@bp.post("/<rtype>/_search")
@requires(FHIR_READ, by_type=AUDIT)
@audit.audited("search-type", "E")
def search_post(rtype: str) -> Response:
    """POST /fhir/{type}/_search with an application/x-www-form-urlencoded body (the URL's
    query parameters, if any, are added)."""
    _check_type(rtype)
    if request.mimetype != "application/x-www-form-urlencoded":
        raise UnsupportedMediaTypeError(
            "POST _search takes application/x-www-form-urlencoded",
            [
                Issue(
                    "POST _search takes an application/x-www-form-urlencoded body",
                    code="not-supported",
                )
            ],
        )
    items = list(request.args.items(multi=True)) + read_form()
    return _search(rtype, items)


# ---------------------------------------------------------------- Patient/$everything


def _everything_types(raw: str) -> set[str]:
    types = {t.strip() for t in raw.split(",") if t.strip()}
    if not types or not types <= _EVERYTHING_TYPES:
        raise BadRequestError(
            "invalid _type",
            [Issue("_type must list supported resource types, comma-separated", code="invalid")],
        )
    return types


def _everything_since(raw: str) -> datetime:
    try:
        lo, _ = parse_range(raw)
    except ValueError:
        raise BadRequestError(
            "invalid _since",
            [Issue("_since must be a FHIR instant, e.g. 2026-03-01T00:00:00Z", code="invalid")],
        ) from None
    return micros_to_datetime(lo)


@bp.get("/Patient/<rid>/$everything")
@requires(FHIR_READ)
@audit.audited("operation", "E")
def everything(rid: str) -> Response:
    """GET /fhir/Patient/{id}/$everything (optional _type, _since): the Patient, its
    compartment (mode match) and the Practitioners/Medications referenced (mode include)."""
    _check_id(rid)
    types: set[str] | None = None
    since: datetime | None = None
    used: list[tuple[str, str]] = []
    unknown: list[str] = []
    for name, raw in request.args.items(multi=True):
        if name == "_type" and raw:
            types = _everything_types(raw)
            used.append((name, raw))
        elif name == "_since" and raw:
            since = _everything_since(raw)
            used.append((name, raw))
        elif name not in _EVERYTHING_PARAMS:
            unknown.append(name)
    if unknown and _strict():
        raise BadRequestError(
            "unknown parameters",
            [
                Issue(f"unknown parameter '{n[:64]}' for $everything", code="not-supported")
                for n in unknown
            ],
        )
    result = services().store.everything_stored(
        rid, types=_EVERYTHING_TYPES if types is None else types, since=since
    )
    audit.note(
        (*result.matches, *result.included),
        query_type="Patient",
        parameters=(n for n, _ in used),
        total=len(result.matches),
    )
    base = _base_url()
    self_url = f"{base}/Patient/{rid}/$everything"
    if used:
        self_url += "?" + urlencode(used)
    links = [{"relation": "self", "url": self_url}]
    # Bundle.total counts matches only, never included resources.
    return _fhir(_searchset(base, links, len(result.matches), result.matches, result.included))
