"""Parse FHIR search parameters into a validated `SearchQuery` (pure; no I/O).

Rules (FHIR R4 search):
- repeated parameters are ANDed, comma-separated values of one parameter are ORed;
  `\\,` `\\|` `\\$` `\\\\` escape;
- token: `code`, `system|code`, `|code` (no system), `system|` (any code of the system);
- reference: `Type/id`, an absolute URL ending in Type/id, a bare `id`, or `param:Type=id`;
- date: optional prefix eq ne gt lt ge le sa eb, then YYYY[-MM[-DD[Thh:mm[:ss[.f]][tz]]]];
- `_count` (clamped to the maximum page size; 0 = total only), `_offset`, `_sort` (comma list
  of `_id`, `_lastUpdated` and the type's date parameters, `-` for descending);
- parameters with an empty value are ignored; unknown parameters are ignored (and left out of
  `SearchQuery.used`) unless `strict`, then rejected; a modifier we do not support, or a
  malformed value, is always rejected.

Errors are `BadRequestError`s that name the parameter and never quote the value.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Literal

from fhirbridge.errors import BadRequestError, Issue
from fhirbridge.store.fhirdates import parse_range
from fhirbridge.store.schema import INDEXED_TEXT_LENGTH
from fhirbridge.store.search_params import ID_RE, SearchParam, params_for, parse_reference

__all__ = [
    "DATE_PREFIXES",
    "MAX_SEARCH_VALUES",
    "Criterion",
    "DateValue",
    "ReferenceValue",
    "SearchQuery",
    "SortKey",
    "TokenValue",
    "parse_search",
    "split_escaped",
]

DatePrefix = Literal["eq", "ne", "gt", "lt", "ge", "le", "sa", "eb"]
DATE_PREFIXES: tuple[DatePrefix, ...] = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb")
_PREFIXES: dict[str, DatePrefix] = {p: p for p in DATE_PREFIXES}
# Bounds a single request's SQL (parameters and OR-ed values in total).
MAX_SEARCH_VALUES = 1000
_MAX_NAME_IN_MESSAGE = 64
_INT_RE = re.compile(r"[0-9]{1,9}", re.ASCII)
_TYPE_RE = re.compile(r"[A-Z][A-Za-z]{0,63}", re.ASCII)


@dataclass(frozen=True, slots=True)
class TokenValue:
    """`code` (any system), `|code` (system_given, system None), `system|code`, `system|`."""

    code: str | None
    system: str | None = None
    system_given: bool = False


@dataclass(frozen=True, slots=True)
class ReferenceValue:
    """A reference to match: `ref` "Type/id" when the type is known, else the bare `id`."""

    id: str
    ref: str | None = None


@dataclass(frozen=True, slots=True)
class DateValue:
    """A prefix and the inclusive UTC µs range of the date value."""

    prefix: DatePrefix
    lo: int
    hi: int


Value = TokenValue | ReferenceValue | DateValue


@dataclass(frozen=True, slots=True)
class Criterion:
    """One parameter occurrence: matches when any of its values matches."""

    param: SearchParam
    values: tuple[Value, ...]


@dataclass(frozen=True, slots=True)
class SortKey:
    """`_id`, `_lastUpdated` or a date parameter name; ascending unless descending."""

    param: str
    descending: bool = False

    def __str__(self) -> str:
        return f"-{self.param}" if self.descending else self.param


@dataclass(frozen=True, slots=True)
class SearchQuery:
    """A validated search: criteria (ANDed), sort, page size and offset."""

    criteria: tuple[Criterion, ...] = ()
    sort: tuple[SortKey, ...] = ()
    count: int = 50
    offset: int = 0
    # The criteria parameters that took effect, exactly as received (for Bundle.link self).
    used: tuple[tuple[str, str], ...] = ()
    # Names of the parameters that were ignored (unknown, or empty values).
    ignored: tuple[str, ...] = field(default=())

    def link_params(self, offset: int | None = None) -> list[tuple[str, str]]:
        """The parameters that reproduce this search at `offset` (default: this page)."""
        out = list(self.used)
        if self.sort:
            out.append(("_sort", ",".join(str(k) for k in self.sort)))
        out.append(("_count", str(self.count)))
        at = self.offset if offset is None else offset
        if at:
            out.append(("_offset", str(at)))
        return out


def _name(name: str) -> str:
    return name if len(name) <= _MAX_NAME_IN_MESSAGE else name[:_MAX_NAME_IN_MESSAGE] + "…"


def _bad(message: str) -> BadRequestError:
    return BadRequestError(message, [Issue(message, code="invalid")])


def split_escaped(text: str, separator: str) -> list[str]:
    """Split on unescaped `separator` and resolve FHIR search escapes (`\\,` `\\|` `\\$` `\\\\`)."""
    parts: list[str] = []
    current: list[str] = []
    chars = iter(text)
    for char in chars:
        if char == "\\":
            nxt = next(chars, None)
            if nxt is None:
                current.append("\\")
            elif nxt in ",|$\\":
                if nxt == separator or separator == "":
                    current.append(nxt)
                else:
                    current.append("\\" + nxt)  # keep for the next split level
            else:
                current.append("\\" + nxt)
        elif char == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _unescape(text: str) -> str:
    return split_escaped(text, "")[0]


def _int(name: str, raw: str) -> int:
    if _INT_RE.fullmatch(raw) is None:
        raise _bad(f"search parameter '{name}' must be a non-negative integer")
    return int(raw)


def _token(sp: SearchParam, raw: str) -> TokenValue:
    if sp.column == "id":
        return TokenValue(code=_unescape(raw))
    parts = split_escaped(raw, "|")
    if len(parts) == 1:
        return TokenValue(code=_unescape(parts[0])[:INDEXED_TEXT_LENGTH])
    if len(parts) != 2 or parts == ["", ""]:
        raise _bad(f"search parameter '{sp.name}' must be code, system|code, |code or system|")
    system = _unescape(parts[0])[:INDEXED_TEXT_LENGTH] or None
    code = _unescape(parts[1])[:INDEXED_TEXT_LENGTH] or None
    return TokenValue(code=code, system=system, system_given=True)


def _reference(sp: SearchParam, modifier: str | None, raw: str) -> ReferenceValue:
    value = _unescape(raw)
    invalid = f"search parameter '{sp.name}' must be Type/id, an id or an absolute reference"
    if modifier is not None:
        if _TYPE_RE.fullmatch(modifier) is None or (sp.targets and modifier not in sp.targets):
            raise _bad(f"unsupported modifier on search parameter '{sp.name}'")
        if ID_RE.fullmatch(value) is None:
            raise _bad(invalid)
        return ReferenceValue(id=value, ref=f"{modifier}/{value}")
    if "/" in value:
        parsed = parse_reference(value) if len(value) <= 2048 else None
        if parsed is None:
            raise _bad(invalid)
        return ReferenceValue(id=parsed[1], ref=f"{parsed[0]}/{parsed[1]}")
    if ID_RE.fullmatch(value) is None:
        raise _bad(invalid)
    if len(sp.targets) == 1:
        return ReferenceValue(id=value, ref=f"{sp.targets[0]}/{value}")
    return ReferenceValue(id=value)


def _date(sp: SearchParam, raw: str) -> DateValue:
    prefix: DatePrefix = "eq"
    text = raw
    if len(raw) >= 2 and raw[:2].isalpha():
        found = _PREFIXES.get(raw[:2])
        if found is None:
            raise _bad(
                f"search parameter '{sp.name}': unsupported prefix "
                f"(use one of {', '.join(DATE_PREFIXES)})"
            )
        prefix = found
        text = raw[2:]
    try:
        lo, hi = parse_range(text)
    except ValueError:
        raise _bad(
            f"search parameter '{sp.name}' must be a FHIR date, e.g. 2026, 2026-03, "
            "2026-03-01 or 2026-03-01T10:00:00+01:00, with an optional prefix"
        ) from None
    return DateValue(prefix, lo, hi)


def _values(sp: SearchParam, modifier: str | None, raw: str) -> tuple[Value, ...]:
    if modifier is not None and sp.type != "reference":
        raise _bad(f"unsupported modifier on search parameter '{sp.name}'")
    values: list[Value] = []
    for part in split_escaped(raw, ","):
        if sp.type == "token":
            values.append(_token(sp, part))
        elif sp.type == "date":
            values.append(_date(sp, part))
        else:
            values.append(_reference(sp, modifier, part))
    return tuple(values)


def _sort(rtype_params: dict[str, SearchParam], raw: str) -> tuple[tuple[SortKey, ...], list[str]]:
    keys: list[SortKey] = []
    unknown: list[str] = []
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        descending = item.startswith("-")
        name = item[1:] if descending else item
        sp = rtype_params.get(name)
        if sp is None or (sp.type != "date" and sp.column != "id"):
            unknown.append(name)
            continue
        keys.append(SortKey(name, descending))
    return tuple(keys), unknown


def parse_search(
    rtype: str,
    items: Iterable[tuple[str, str]],
    *,
    strict: bool = False,
    default_count: int = 50,
    max_count: int = 500,
    reserved: Collection[str] = ("_format", "_pretty"),
) -> SearchQuery:
    """Validate search parameters (name, raw value) for a supported `rtype`.

    `reserved` names are handled by the caller (response format) and skipped here.
    Raises BadRequestError for malformed values, unsupported modifiers, too many values, and
    (when `strict`) unknown parameters or sort keys.
    """
    params = dict(params_for(rtype))
    criteria: list[Criterion] = []
    used: list[tuple[str, str]] = []
    ignored: list[str] = []
    unknown: list[str] = []
    sort: tuple[SortKey, ...] = ()
    count = min(default_count, max_count)
    offset = 0
    total_values = 0
    for name, raw in items:
        if "\x00" in name or "\x00" in raw:
            raise _bad("search parameters must not contain NUL characters")
        if name in reserved:
            continue
        if name == "_count":
            count = min(_int(name, raw), max_count)
            continue
        if name == "_offset":
            offset = _int(name, raw)
            continue
        if name == "_sort":
            sort, bad_keys = _sort(params, raw)
            if bad_keys and strict:
                raise _bad(
                    "unsupported _sort key(s): "
                    + ", ".join(f"'{_name(k)}'" for k in bad_keys)
                    + " (supported: _id, _lastUpdated and the date parameters)"
                )
            if bad_keys:
                ignored.append(name)
            continue
        base, colon, modifier = name.partition(":")
        sp = params.get(base)
        if sp is None:
            (unknown if strict else ignored).append(name)
            continue
        if raw == "":
            ignored.append(name)
            continue
        values = _values(sp, modifier if colon else None, raw)
        total_values += len(values)
        if total_values > MAX_SEARCH_VALUES:
            raise _bad(f"too many search values (at most {MAX_SEARCH_VALUES} per request)")
        criteria.append(Criterion(sp, values))
        used.append((name, raw))
    if unknown:
        issues = [
            Issue(f"unknown search parameter '{_name(n)}' for {rtype}", code="not-supported")
            for n in unknown
        ]
        raise BadRequestError("unknown search parameters", issues)
    return SearchQuery(
        criteria=tuple(criteria),
        sort=sort,
        count=count,
        offset=offset,
        used=tuple(used),
        ignored=tuple(ignored),
    )
