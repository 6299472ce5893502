"""The mapping pack's terminology tables as FHIR R4 ConceptMap resources under /fhir (read-only).

    GET  /fhir/ConceptMap?…              search: searchset Bundle, offset paging
    POST /fhir/ConceptMap/_search        the same, form-encoded body
    GET  /fhir/ConceptMap/{id}           read

The ConceptMaps (fhirbridge.fhir.conceptmap) are built from the loaded pack once per app, checked
by the output validator (R4B models + official R4 JSON Schema) and kept, serialized, in
``app.extensions["fhirbridge.conceptmaps"]``: nothing is built per request, nothing is stored
in the database. A map that fails validation stops the app at start-up, naming its table file,
like any other broken mapping file.

Search parameters: ``_id`` (token), ``url`` (uri, exact), ``name`` (string: case- and
accent-insensitive prefix; ``:exact``, ``:contains``), ``source-system`` / ``target-system``
(uri, exact, any group), ``_count`` (clamped to the maximum page size; 0 = total only) and
``_offset``. Comma-separated values are ORed, repeated parameters ANDed, empty values ignored.
As in the rest of /fhir: unknown parameters are ignored (and left out of the self link) unless
the request says ``Prefer: handling=strict``; an unsupported modifier or a malformed value is a
400 OperationOutcome naming the parameter, never quoting the value; content negotiation
(``Accept``, ``_format``) is the read API's. Responses are application/fhir+json; charset=utf-8.

The static ``/fhir/ConceptMap`` rules outrank the read API's ``/fhir/<rtype>`` rules in
werkzeug's matcher (static path parts sort before converters), whatever the registration order.
"""

from __future__ import annotations

import threading
import unicodedata
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import urlencode

import orjson
from flask import Blueprint, Flask, Response, current_app, request

from fhirbridge import audit
from fhirbridge.api.access import FHIR_READ, requires
from fhirbridge.api.body import read_form
from fhirbridge.api.fhir import _base_url, _negotiate, _strict
from fhirbridge.api.http import FHIR_JSON
from fhirbridge.errors import (
    BadRequestError,
    Issue,
    MappingConfigError,
    MappingProblem,
    NotFoundError,
    UnsupportedMediaTypeError,
)
from fhirbridge.fhir.bundle import searchset_bundle
from fhirbridge.fhir.conceptmap import table_to_conceptmap
from fhirbridge.mapping.yamlsrc import line_of
from fhirbridge.store.fhirdates import format_instant, micros
from fhirbridge.store.query import split_escaped

__all__ = ["EXTENSION_KEY", "ConceptMapIndex", "bp", "conceptmap_capability", "init_app"]

bp = Blueprint("terminology", __name__, url_prefix="/fhir")
bp.before_request(_negotiate)

EXTENSION_KEY: Final = "fhirbridge.conceptmaps"
FHIR_JSON_UTF8: Final = f"{FHIR_JSON}; charset=utf-8"
RESOURCE_TYPE: Final = "ConceptMap"
_SP: Final = "http://hl7.org/fhir/SearchParameter/"
_RESERVED: Final = frozenset({"_format", "_pretty"})
_MAX_NAME_IN_MESSAGE: Final = 64
_MAX_SEARCH_VALUES: Final = 1000
_build_lock = threading.Lock()


# ---------------------------------------------------------------- the maps, built once per app


@dataclass(frozen=True)
class ConceptMapIndex:
    """The pack's ConceptMaps in table-name order, and each one serialized, by id."""

    resources: tuple[dict[str, Any], ...]
    json_by_id: dict[str, bytes]

    @classmethod
    def build(cls, app: Flask) -> ConceptMapIndex:
        """Build and validate the maps of the app's pack; MappingConfigError if one is invalid."""
        svc = app.extensions["fhirbridge"]
        resources: list[dict[str, Any]] = []
        problems: list[MappingProblem] = []
        for name in sorted(svc.pack.tables):
            table = svc.pack.tables[name]
            resource = table_to_conceptmap(table, svc.pack)
            if resource is None:
                continue
            resources.append(resource)
            problems += [
                MappingProblem(
                    table.file,
                    "/rows",
                    "its ConceptMap fails FHIR R4 validation: "
                    f"{', '.join(issue.expression) or '-'}: {issue.diagnostics}",
                    line_of(table.lines, "/rows"),
                )
                for issue in svc.output_validator.validate(resource)
            ]
        if problems:
            raise MappingConfigError(problems)
        return cls(tuple(resources), {r["id"]: orjson.dumps(r) for r in resources})


def conceptmaps(app: Flask | None = None) -> ConceptMapIndex:
    """The app's ConceptMapIndex, built on first use when init_app could not build it yet."""
    target: Flask = app if app is not None else current_app
    index = target.extensions.get(EXTENSION_KEY)
    if index is None:
        with _build_lock:
            index = target.extensions.get(EXTENSION_KEY)
            if index is None:
                index = ConceptMapIndex.build(target)
                target.extensions[EXTENSION_KEY] = index
    assert isinstance(index, ConceptMapIndex)
    return index


def init_app(app: Flask) -> None:
    """Register the ConceptMap routes; build the maps now if the services are registered."""
    app.register_blueprint(bp)
    if "fhirbridge" in app.extensions:
        conceptmaps(app)


# ---------------------------------------------------------------- capability


@dataclass(frozen=True, slots=True)
class _Param:
    name: str
    type: str
    definition: str
    documentation: str
    modifiers: frozenset[str] = frozenset()


_PARAMS: Final[dict[str, _Param]] = {
    p.name: p
    for p in (
        _Param("_id", "token", _SP + "Resource-id", "Logical id of the ConceptMap"),
        _Param(
            "url",
            "uri",
            _SP + "conformance-url",
            "Canonical URL, exact match (urn:fhirbridge:ConceptMap:<table>)",
        ),
        _Param(
            "name",
            "string",
            _SP + "conformance-name",
            "Computable name (e.g. AdverseEventTerms): case- and accent-insensitive prefix; "
            ":exact and :contains supported",
            frozenset({"exact", "contains"}),
        ),
        _Param(
            "source-system",
            "uri",
            _SP + "ConceptMap-source-system",
            "Code system of the local codes (group.source), exact match",
        ),
        _Param(
            "target-system",
            "uri",
            _SP + "ConceptMap-target-system",
            "Code system mapped to (group.target), exact match",
        ),
    )
}


def conceptmap_capability() -> dict[str, Any]:
    """The CapabilityStatement.rest.resource entry for ConceptMap (read and search-type)."""
    return {
        "type": RESOURCE_TYPE,
        "profile": "http://hl7.org/fhir/StructureDefinition/ConceptMap",
        "documentation": (
            "The mapping pack's terminology tables (local code → standard code), one "
            "ConceptMap per code table, built from the pack at start-up. Read-only; the pack "
            "version is ConceptMap.version. Paging with _count and _offset."
        ),
        "interaction": [{"code": "read"}, {"code": "search-type"}],
        "versioning": "no-version",
        "readHistory": False,
        "conditionalRead": "not-supported",
        "searchParam": [
            {
                "name": p.name,
                "definition": p.definition,
                "type": p.type,
                "documentation": p.documentation,
            }
            for p in _PARAMS.values()
        ],
    }


# ---------------------------------------------------------------- search


def _name(name: str) -> str:
    return name if len(name) <= _MAX_NAME_IN_MESSAGE else name[:_MAX_NAME_IN_MESSAGE] + "…"


def _bad(message: str) -> BadRequestError:
    return BadRequestError(message, [Issue(message, code="invalid")])


def _int(name: str, raw: str) -> int:
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 9):
        raise _bad(f"search parameter '{name}' must be a non-negative integer")
    return int(raw)


def _fold(text: str) -> str:
    """Case- and accent-insensitive form (FHIR string search)."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


Matcher = Callable[[dict[str, Any]], bool]


def _groups(resource: dict[str, Any], key: str) -> set[str]:
    return {g[key] for g in resource.get("group", []) if key in g}


def _matcher(param: _Param, modifier: str | None, values: list[str]) -> Matcher:
    if param.name == "_id":
        ids = set(values)
        return lambda r: r["id"] in ids
    if param.name == "url":
        urls = set(values)
        return lambda r: r.get("url") in urls
    if param.name in ("source-system", "target-system"):
        systems = set(values)
        key = "source" if param.name == "source-system" else "target"
        return lambda r: not systems.isdisjoint(_groups(r, key))
    if modifier == "exact":
        exact = set(values)
        return lambda r: r.get("name") in exact
    folded = [_fold(v) for v in values]
    if modifier == "contains":
        return lambda r: any(v in _fold(r.get("name", "")) for v in folded)
    return lambda r: any(_fold(r.get("name", "")).startswith(v) for v in folded)


@dataclass(frozen=True)
class _Query:
    matchers: tuple[Matcher, ...]
    used: tuple[tuple[str, str], ...]
    count: int
    offset: int

    def link(self, base: str, offset: int | None = None) -> str:
        params = [*self.used, ("_count", str(self.count))]
        at = self.offset if offset is None else offset
        if at:
            params.append(("_offset", str(at)))
        return f"{base}/{RESOURCE_TYPE}?{urlencode(params)}"


def _parse(items: Sequence[tuple[str, str]], strict: bool) -> _Query:
    settings = current_app.extensions["fhirbridge"].settings
    count = min(settings.page_size, settings.max_page_size)
    offset = 0
    matchers: list[Matcher] = []
    used: list[tuple[str, str]] = []
    unknown: list[str] = []
    total_values = 0
    for name, raw in items:
        if "\x00" in name or "\x00" in raw:
            raise _bad("search parameters must not contain NUL characters")
        if name in _RESERVED:
            continue
        if name == "_count":
            count = min(_int(name, raw), settings.max_page_size)
            continue
        if name == "_offset":
            offset = _int(name, raw)
            continue
        base, colon, modifier = name.partition(":")
        param = _PARAMS.get(base)
        if param is None:
            if strict:
                unknown.append(name)
            continue
        if colon and modifier not in param.modifiers:
            raise _bad(f"unsupported modifier on search parameter '{param.name}'")
        if raw == "":
            continue
        values = split_escaped(raw, ",")
        total_values += len(values)
        if total_values > _MAX_SEARCH_VALUES:
            raise _bad(f"too many search values (at most {_MAX_SEARCH_VALUES} per request)")
        matchers.append(_matcher(param, modifier if colon else None, values))
        used.append((name, raw))
    if unknown:
        issues = [
            Issue(
                f"unknown search parameter '{_name(n)}' for {RESOURCE_TYPE}", code="not-supported"
            )
            for n in unknown
        ]
        raise BadRequestError("unknown search parameters", issues)
    return _Query(tuple(matchers), tuple(used), count, offset)


def _paging_links(base: str, query: _Query, total: int) -> dict[str, str]:
    links = {"self": query.link(base)}
    count = query.count
    if count == 0:
        return links
    last = ((total - 1) // count) * count if total else 0
    links["first"] = query.link(base, 0)
    if query.offset > 0:
        links["previous"] = query.link(base, min(max(query.offset - count, 0), last))
    if query.offset + count < total:
        links["next"] = query.link(base, query.offset + count)
    links["last"] = query.link(base, last)
    return links


def _fhir(body: bytes, status: int = 200) -> Response:
    return Response(body, status=status, content_type=FHIR_JSON_UTF8)


def _search(items: Sequence[tuple[str, str]]) -> Response:
    query = _parse(items, _strict())
    matches = [r for r in conceptmaps().resources if all(m(r) for m in query.matchers)]
    page = matches[query.offset : query.offset + query.count] if query.count else []
    audit.note(
        (audit.Ref(RESOURCE_TYPE, r["id"]) for r in page),
        query_type=RESOURCE_TYPE,
        parameters=(n for n, _ in query.used),
        total=len(matches),
    )
    base = _base_url()
    bundle = searchset_bundle(
        page, base_url=base, total=len(matches), links=_paging_links(base, query, len(matches))
    )
    bundle = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"lastUpdated": format_instant(micros(datetime.now(UTC)))},
        **{k: v for k, v in bundle.items() if k != "resourceType"},
    }
    return _fhir(orjson.dumps(bundle))


@bp.get(f"/{RESOURCE_TYPE}")
@requires(FHIR_READ)
@audit.audited("search-type", "E")
def search() -> Response:
    """GET /fhir/ConceptMap?params: a searchset Bundle."""
    return _search(list(request.args.items(multi=True)))


@bp.post(f"/{RESOURCE_TYPE}/_search")
@requires(FHIR_READ)
@audit.audited("search-type", "E")
def search_post() -> Response:
    """POST /fhir/ConceptMap/_search, application/x-www-form-urlencoded (URL parameters too)."""
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
    return _search(items)


# ---------------------------------------------------------------- read


@bp.get(f"/{RESOURCE_TYPE}/<rid>")
@requires(FHIR_READ)
@audit.audited("read", "R")
def read(rid: str) -> Response:
    """GET /fhir/ConceptMap/{id}."""
    body = conceptmaps().json_by_id.get(rid)
    if body is None:
        raise NotFoundError("resource not found")
    audit.note([audit.Ref(RESOURCE_TYPE, rid)])
    return _fhir(body)
