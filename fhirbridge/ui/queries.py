"""Read-only queries of the ops console beyond the sync API's: submissions and their delivery.

Everything returned is an identifier, a time, a status or a count: submission ids, the source
system's name, our resource types and ids. The stored submission summary also holds the
clinic's own record ids (`sourceId`), which may be an MRN; they are never read out of it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import select

from fhirbridge.api.submissions import _produced as produced_keys
from fhirbridge.store.resources import ResourceStore
from fhirbridge.store.schema import submissions
from fhirbridge.sync.outbox import Delivery, Outbox

_s = submissions.c


@dataclass(frozen=True)
class SubmissionView:
    """One accepted submission: ids and times, and per target its deliveries by status."""

    id: str
    source: str
    received_at: datetime
    resources: tuple[tuple[str, str], ...]
    # target → status → count (every configured target, even with nothing queued)
    delivery: dict[str, Counter[str]] = field(default_factory=dict)
    rows: tuple[Delivery, ...] = ()


def _view(row: Any, targets: Sequence[str], found: Sequence[Delivery]) -> SubmissionView:
    keys = tuple(produced_keys(orjson.loads(row.summary)))
    wanted = set(keys)
    mine = tuple(d for d in found if d.key in wanted)
    delivery: dict[str, Counter[str]] = {t: Counter() for t in targets}
    for d in mine:
        delivery.setdefault(d.target, Counter())[d.status] += 1
    return SubmissionView(row.id, row.source, row.received_at, keys, delivery, mine)


def recent_submissions(
    store: ResourceStore, outbox: Outbox, targets: Sequence[str], *, limit: int = 20
) -> list[SubmissionView]:
    """The newest `limit` submissions, each with where its resources' deliveries stand."""
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(_s.id, _s.source, _s.received_at, _s.summary)
            .order_by(_s.received_at.desc(), _s.id)
            .limit(limit)
        ).all()
    keys = {k for r in rows for k in produced_keys(orjson.loads(r.summary))}
    found = outbox.for_resources(sorted(keys))
    return [_view(r, targets, found) for r in rows]


def submission(
    store: ResourceStore, outbox: Outbox, targets: Sequence[str], submission_id: str
) -> SubmissionView | None:
    """One submission with every delivery row of the resources it produced, or None."""
    with store.engine.connect() as conn:
        row = conn.execute(
            select(_s.id, _s.source, _s.received_at, _s.summary).where(_s.id == submission_id)
        ).one_or_none()
    if row is None:
        return None
    keys = produced_keys(orjson.loads(row.summary))
    return _view(row, targets, outbox.for_resources(keys))
