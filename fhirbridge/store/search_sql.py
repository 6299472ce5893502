"""Translate a `SearchQuery` into SQLAlchemy Core statements over the store's tables.

Query shape (chosen so that SQLite's planner, and PostgreSQL's before ANALYZE, cannot go wrong):
- `_id` and `_lastUpdated` are conditions on the resource row;
- the most selective other criterion (reference, then identifier, then other tokens, then
  dates) drives: `id IN (SELECT resource_id FROM fhir_search_index WHERE …)`, answered from the
  (ref, …) / (resource_type, param, value, …) / date indexes, then primary-key lookups;
- every other criterion is a correlated EXISTS probe on (resource_type, resource_id, param);
- sorting by a date parameter aggregates its index rows per resource (earliest start
  ascending, latest end descending, no value last) in a page-of-ids subquery.

Date matching follows FHIR R4: both the target value and the search value are ranges
[lo, hi] (inclusive, µs); with search range [slo, shi]:
    eq  slo <= lo and hi <= shi        ne  not eq
    gt  hi > shi                       lt  lo < slo
    ge  gt or eq                       le  lt or eq
    sa  lo > shi                       eb  hi < slo
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Select,
    and_,
    exists,
    false,
    func,
    not_,
    or_,
    select,
)
from sqlalchemy.sql.elements import UnaryExpression

from fhirbridge.store.query import (
    Criterion,
    DateValue,
    ReferenceValue,
    SearchQuery,
    SortKey,
    TokenValue,
)
from fhirbridge.store.schema import resources, search_index

__all__ = ["count_statement", "date_condition", "page_statement", "where_clause"]

_r = resources.c
_si = search_index.c
_COLUMN_SORTS = ("_id", "_lastUpdated")
_DRIVER_RANK = {"reference": 0, "token": 2, "date": 3}


def date_condition(
    lo: ColumnElement[int], hi: ColumnElement[int], value: DateValue
) -> ColumnElement[bool]:
    """The FHIR date-prefix comparison of target range [lo, hi] with the search value."""
    within = and_(lo >= value.lo, hi <= value.hi)
    match value.prefix:
        case "eq":
            return within
        case "ne":
            return not_(within)
        case "gt":
            return hi > value.hi
        case "lt":
            return lo < value.lo
        case "ge":
            return or_(hi > value.hi, within)
        case "le":
            return or_(lo < value.lo, within)
        case "sa":
            return lo > value.hi
        case "eb":
            return hi < value.lo
    raise AssertionError(value.prefix)  # pragma: no cover


def _value_condition(
    index: Any, value: TokenValue | ReferenceValue | DateValue, *, probe: bool
) -> ColumnElement[bool]:
    # In a per-resource probe, `col || ''` / `col + 0` keep the planner off the value indexes
    # (which would scan every row with that value) and on (resource_type, resource_id, param).
    def text(column: Any) -> ColumnElement[Any]:
        return column.concat("") if probe else column  # type: ignore[no-any-return]

    def number(column: Any) -> ColumnElement[Any]:
        return column + 0 if probe else column  # type: ignore[no-any-return]

    if isinstance(value, TokenValue):
        conditions: list[ColumnElement[bool]] = []
        if value.code is not None:
            conditions.append(text(index.value) == value.code)
        if value.system_given:
            conditions.append(
                index.system.is_(None)
                if value.system is None
                else text(index.system) == value.system
            )
        return and_(*conditions)
    if isinstance(value, ReferenceValue):
        if value.ref is not None:
            return text(index.ref) == value.ref
        return text(index.value) == value.id
    return date_condition(number(index.date_lo), number(index.date_hi), value)


def _matches(index: Any, criterion: Criterion, *, probe: bool = False) -> ColumnElement[bool]:
    return and_(
        index.param == criterion.param.name,
        or_(*(_value_condition(index, v, probe=probe) for v in criterion.values)),
    )


def _partial_index_terms(criterion: Criterion) -> list[ColumnElement[bool]]:
    """Terms that let the planner use the partial indexes on date and reference rows (only
    those rows are in them): true of every row the criterion can match, stated plainly,
    because neither SQLite nor PostgreSQL infers them through an OR of ranges."""
    if criterion.param.type == "date":
        return [_si.date_lo.is_not(None), _si.date_hi.is_not(None)]
    if criterion.param.type == "reference" and all(
        isinstance(v, ReferenceValue) and v.ref is not None for v in criterion.values
    ):
        return [_si.ref.is_not(None)]
    return []


def _rank(criterion: Criterion) -> int:
    sp = criterion.param
    if sp.name == "identifier":
        return 1
    return _DRIVER_RANK[sp.type]


def _column_condition(criterion: Criterion) -> ColumnElement[bool]:
    if criterion.param.column == "id":
        ids = [v.code for v in criterion.values if isinstance(v, TokenValue) and v.code]
        return _r.id.in_(ids) if ids else false()
    return or_(
        *(
            date_condition(_r.last_updated, _r.last_updated, v)
            for v in criterion.values
            if isinstance(v, DateValue)
        )
    )


def where_clause(rtype: str, query: SearchQuery) -> ColumnElement[bool]:
    """Current, non-deleted resources of `rtype` matching every criterion of `query`."""
    conditions: list[ColumnElement[bool]] = [_r.resource_type == rtype, _r.deleted.is_(False)]
    indexed: list[Criterion] = []
    for criterion in query.criteria:
        if criterion.param.column is not None:
            conditions.append(_column_condition(criterion))
        else:
            indexed.append(criterion)
    by_id = any(c.param.column == "id" for c in query.criteria)
    if indexed and not by_id:
        driver = min(indexed, key=_rank)
        indexed.remove(driver)
        driving = select(_si.resource_id).where(
            _si.resource_type == rtype, _matches(_si, driver), *_partial_index_terms(driver)
        )
        conditions.append(_r.id.in_(driving.scalar_subquery()))
    for criterion in indexed:
        probe = search_index.alias()
        conditions.append(
            exists().where(
                probe.c.resource_type == _r.resource_type,
                probe.c.resource_id == _r.id,
                _matches(probe.c, criterion, probe=True),
            )
        )
    return and_(*conditions)


def count_statement(rtype: str, query: SearchQuery) -> Select[int]:
    """SELECT count(*) of the matches."""
    return select(func.count()).select_from(resources).where(where_clause(rtype, query))


def _ordered(
    column: ColumnElement[Any], descending: bool, *, nulls_last: bool = False
) -> UnaryExpression[Any]:
    ordered = column.desc() if descending else column.asc()
    return ordered.nulls_last() if nulls_last else ordered


def _ordering(
    keys: Sequence[SortKey],
    id_column: ColumnElement[Any],
    last_updated: ColumnElement[Any],
    dates: Mapping[int, ColumnElement[Any]],
) -> list[UnaryExpression[Any]]:
    out: list[UnaryExpression[Any]] = []
    for i, key in enumerate(keys):
        if key.param == "_id":
            out.append(_ordered(id_column, key.descending))
        elif key.param == "_lastUpdated":
            out.append(_ordered(last_updated, key.descending))
        else:
            out.append(_ordered(dates[i], key.descending, nulls_last=True))
    if not any(k.param == "_id" for k in keys):
        out.append(id_column.asc())
    return out


def page_statement(rtype: str, query: SearchQuery, columns: Sequence[Any]) -> Select[Any]:
    """SELECT `columns` of the resources on the page at query.offset (query.count of them), in
    the query's sort order (default: _lastUpdated), ties broken by id."""
    where = where_clause(rtype, query)
    keys = list(query.sort) or [SortKey("_lastUpdated")]
    if all(k.param in _COLUMN_SORTS for k in keys):
        last_updated: ColumnElement[Any] = _r.last_updated
        id_column: ColumnElement[Any] = _r.id
        if query.criteria:
            # Sort the (few) matches instead of walking the whole type in index order.
            last_updated, id_column = _r.last_updated + 0, _r.id.concat("")
        order = _ordering(keys, id_column, last_updated, {})
        if not any(k.param == "_id" for k in keys):
            order[-1] = _r.id.asc()
        return (
            select(*columns).where(where).order_by(*order).limit(query.count).offset(query.offset)
        )

    # One outer join per date parameter sorted on; aggregate its values per resource.
    joined: Any = resources
    aliases: dict[str, Any] = {}
    for key in keys:
        if key.param not in _COLUMN_SORTS and key.param not in aliases:
            alias = search_index.alias(f"sort_{len(aliases)}")
            aliases[key.param] = alias
            joined = joined.outerjoin(
                alias,
                and_(
                    alias.c.resource_type == _r.resource_type,
                    alias.c.resource_id == _r.id,
                    alias.c.param == key.param,
                ),
            )
    aggregates: dict[int, ColumnElement[Any]] = {}
    for i, key in enumerate(keys):
        if key.param in aliases:
            alias = aliases[key.param]
            bound = func.max(alias.c.date_hi) if key.descending else func.min(alias.c.date_lo)
            aggregates[i] = bound.label(f"sort_key_{i}")
    page = (
        select(_r.id.label("page_id"), _r.last_updated.label("page_updated"), *aggregates.values())
        .select_from(joined)
        .where(where)
        .group_by(_r.resource_type, _r.id, _r.last_updated)
        .order_by(*_ordering(keys, _r.id, _r.last_updated, aggregates))
        .limit(query.count)
        .offset(query.offset)
        .subquery("page")
    )
    page_keys = {i: page.c[f"sort_key_{i}"] for i in aggregates}
    return (
        select(*columns)
        .select_from(resources)
        .join(page, and_(_r.resource_type == rtype, _r.id == page.c.page_id))
        .order_by(*_ordering(keys, page.c.page_id, page.c.page_updated, page_keys))
    )
