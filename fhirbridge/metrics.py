"""Prometheus metrics: the per-app registry, the sync-ledger collector, gunicorn's hooks.

Two kinds of numbers, kept apart on purpose:

- **Events counted in the process** (HTTP requests, submissions, mapping errors): prometheus
  counters and a histogram. Under gunicorn every worker counts its own requests, so with
  ``PROMETHEUS_MULTIPROC_DIR`` set they are written to per-process files there and a scrape
  of any worker sums every worker's files (``MultiProcessCollector``).
- **Delivery state** (the sync ledger): never counted in a process, read from the database at
  scrape time by `SyncCollector` with one GROUP BY, so the answer is the same whichever
  gunicorn worker answers and whatever the separate ``fhirbridge worker`` processes did.

Every app gets its own `CollectorRegistry` (never prometheus_client's global one), so several
apps in one process, as in the tests, do not collide. Labels never carry input values: routes
are URL rule templates, rules come from the mapping pack, states from the ledger.
No Flask here; `fhirbridge.api.metrics` serves it.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, get_args

from prometheus_client import CollectorRegistry, Counter, Histogram, values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import SQLAlchemyError

from fhirbridge.errors import InputInvalidError, OutputInvalidError
from fhirbridge.store.schema import delivery
from fhirbridge.sync.outbox import FINAL_STATUSES, Status

log = logging.getLogger(__name__)

#: prometheus_client's own variable: a directory shared by every process of one server.
MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
UNMATCHED_ROUTE: Final = "<unmatched>"
INPUT_SCHEMA_RULE: Final = "input-schema"
UNKNOWN_RULE: Final = "unknown"
OTHER_METHOD: Final = "other"
_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: Every ledger status, in a fixed order, so each target always exposes the same series.
LEDGER_STATES: Final[tuple[str, ...]] = get_args(Status)

SubmissionOutcome = Literal["created", "unchanged", "rejected"]

# pipeline.py and mapping/engine.py start every per-rule diagnostic with "rule '<name>'".
_RULE_PREFIX = re.compile(r"^rule '([a-z0-9][a-z0-9-]*)'")


def multiprocess_dir() -> Path | None:
    """The directory of multi-process mode, or None (one process: counters live in memory)."""
    path = os.environ.get(MULTIPROC_ENV)
    return Path(path) if path else None


@dataclass(frozen=True)
class AppMetrics:
    """One app's metrics; `registry` is what /metrics exposes."""

    registry: CollectorRegistry
    http_requests: Counter
    http_duration: Histogram
    submissions: Counter
    mapping_errors: Counter
    rule_names: frozenset[str]

    def observe_request(
        self, route: str | None, method: str, status: int, seconds: float | None
    ) -> None:
        """Count one answered request; `route` is the URL rule template (None: no rule matched)."""
        route_label = route or UNMATCHED_ROUTE
        method_label = method if method in _METHODS else OTHER_METHOD
        self.http_requests.labels(route_label, method_label, str(status)).inc()
        if seconds is not None:
            self.http_duration.labels(route_label, method_label).observe(seconds)

    def count_submission(self, outcome: SubmissionOutcome) -> None:
        self.submissions.labels(outcome).inc()

    def count_rejection(self, error: Exception) -> None:
        """A refused submission, and its mapping or validation errors by rule."""
        self.count_submission("rejected")
        for rule in error_rules(error, self.rule_names):
            self.mapping_errors.labels(rule).inc()


def error_rules(error: Exception, rule_names: frozenset[str]) -> list[str]:
    """The rule label of each issue of a mapping or validation error (one label per issue).

    Input problems are ``input-schema``; output problems name the pack rule that produced the
    element, taken from the diagnostic and kept only if the pack has a rule of that name, so a
    label is never anything but a rule name from the pack (``unknown`` otherwise).
    Other errors (malformed JSON, wrong media type) are no mapping error: no labels.
    """
    if isinstance(error, InputInvalidError):
        return [INPUT_SCHEMA_RULE for _ in error.issues]
    if isinstance(error, OutputInvalidError):
        return [_rule_of(issue.diagnostics, rule_names) for issue in error.issues]
    return []


def _rule_of(diagnostics: str, rule_names: frozenset[str]) -> str:
    found = _RULE_PREFIX.match(diagnostics)
    return found.group(1) if found and found.group(1) in rule_names else UNKNOWN_RULE


def build_metrics(sync: SyncCollector | None = None, rule_names: Iterable[str] = ()) -> AppMetrics:
    """The metrics of one app; `sync` (read at scrape time) joins its registry.

    Every outcome and every rule of the pack (`rule_names`) starts at 0, so the first
    rejection is an increase Prometheus can see rather than a new series.

    With PROMETHEUS_MULTIPROC_DIR set, counters and the histogram are written to that
    directory (it must exist) and the registry reads every process's files there.
    """
    registry = CollectorRegistry()
    path = multiprocess_dir()
    owner: CollectorRegistry | None = registry
    if path is not None:
        if not path.is_dir():
            raise ValueError(f"{MULTIPROC_ENV} is set but {path} is not a directory")
        _use_file_values()
        MultiProcessCollector(registry, str(path))  # type: ignore[no-untyped-call]
        owner = None  # the files are exposed through the MultiProcessCollector only
    metrics = AppMetrics(
        registry=registry,
        http_requests=Counter(
            "fhirbridge_http_requests",
            "HTTP requests answered, by URL rule template, method and status.",
            ["route", "method", "status"],
            registry=owner,
        ),
        http_duration=Histogram(
            "fhirbridge_http_request_duration_seconds",
            "Time to answer an HTTP request, by URL rule template and method.",
            ["route", "method"],
            registry=owner,
        ),
        submissions=Counter(
            "fhirbridge_submissions",
            "POST /api/v1/submissions by outcome: created (stored, something changed), "
            "unchanged (already stored), rejected (refused, nothing stored).",
            ["outcome"],
            registry=owner,
        ),
        mapping_errors=Counter(
            "fhirbridge_mapping_errors",
            "Problems in rejected submissions by mapping rule (input-schema: the input "
            "failed the source schema or its integrity rules).",
            ["rule"],
            registry=owner,
        ),
        rule_names=frozenset(rule_names),
    )
    for outcome in get_args(SubmissionOutcome):
        metrics.submissions.labels(outcome)
    for rule in sorted({INPUT_SCHEMA_RULE, *metrics.rule_names}):
        metrics.mapping_errors.labels(rule)
    if sync is not None:
        registry.register(sync)
    return metrics


def _use_file_values() -> None:
    """Make new metrics file-backed even if prometheus_client was imported before the env var.

    prometheus_client chooses its value class once, when first imported; a process that set
    PROMETHEUS_MULTIPROC_DIR later would keep in-memory values that no scrape ever sees.
    """
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]


class SyncCollector:
    """Delivery state per target, read from the sync ledger (``sync_delivery``) at scrape time.

    ``fhirbridge_sync_resources{target,state}``: ledger rows (one per target and resource) in
    each state; ``fhirbridge_sync_queue_depth{target}``: rows not yet final;
    ``fhirbridge_sync_oldest_waiting_seconds{target}``: age of the oldest of those (0: none);
    ``fhirbridge_sync_ledger_up``: 0 when the database could not be read (the rest is then
    left out, and HTTP metrics are still served).
    """

    def __init__(
        self,
        engine: Engine,
        targets: Sequence[str],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._engine = engine
        self._targets = list(targets)
        self._clock = clock

    def describe(self) -> Iterable[Metric]:
        return list(_families())

    def collect(self) -> Iterable[Metric]:
        resources, depth, oldest, up = _families()
        try:
            counts = self._read()
        except SQLAlchemyError as exc:
            log.warning("sync metrics: cannot read the ledger (%s)", type(exc).__name__)
            up.add_metric([], 0)
            return [up]
        now_us = int(self._clock() * 1_000_000)
        targets = list(dict.fromkeys([*self._targets, *(t for t, _ in counts)]))
        for target in targets:
            states = {s: counts.get((target, s), (0, None)) for s in LEDGER_STATES}
            states.update({s: v for (t, s), v in counts.items() if t == target})
            waiting = [v for s, v in states.items() if s not in FINAL_STATUSES]
            first = min((q for _, q in waiting if q is not None), default=None)
            for state, (count, _) in states.items():
                resources.add_metric([target, state], count)
            depth.add_metric([target], sum(n for n, _ in waiting))
            oldest.add_metric([target], 0 if first is None else max(0, now_us - first) / 1e6)
        up.add_metric([], 1)
        return [resources, depth, oldest, up]

    def _read(self) -> dict[tuple[str, str], tuple[int, int | None]]:
        """(target, status) → (rows, oldest queued_at in µs): one GROUP BY over the ledger."""
        d = delivery.c
        stmt = select(d.target, d.status, func.count(), func.min(d.queued_at)).group_by(
            d.target, d.status
        )
        with self._engine.connect() as conn:
            return {(r[0], r[1]): (int(r[2]), r[3]) for r in conn.execute(stmt)}


def _families() -> tuple[GaugeMetricFamily, ...]:
    return (
        GaugeMetricFamily(
            "fhirbridge_sync_resources",
            "Sync ledger rows (one per target and resource) by state.",
            labels=["target", "state"],
        ),
        GaugeMetricFamily(
            "fhirbridge_sync_queue_depth",
            "Sync ledger rows of a target not yet in a final state (sent, dead, fallback, "
            "skipped).",
            labels=["target"],
        ),
        GaugeMetricFamily(
            "fhirbridge_sync_oldest_waiting_seconds",
            "Age of the oldest ledger row of a target not yet in a final state (0: none).",
            labels=["target"],
        ),
        GaugeMetricFamily(
            "fhirbridge_sync_ledger_up",
            "1 if the sync ledger could be read for this scrape, else 0.",
            labels=[],
        ),
    )


# --------------------------------------------------------------------------- gunicorn hooks


def child_exit(server: Any, worker: Any) -> None:
    """gunicorn ``child_exit`` hook: drop the live-gauge files of a dead worker.

    Its counter and histogram files stay, so totals survive the worker. Harmless (and a
    no-op) without PROMETHEUS_MULTIPROC_DIR.
    """
    path = multiprocess_dir()
    if path is not None:
        mark_process_dead(worker.pid, str(path))  # type: ignore[no-untyped-call]


def on_starting(server: Any) -> None:
    """gunicorn ``on_starting`` hook: start every run with an empty PROMETHEUS_MULTIPROC_DIR."""
    clear_multiprocess_dir()


def clear_multiprocess_dir() -> int:
    """Delete the metric files of an earlier run; returns how many were deleted.

    Counters restart at zero with the server, as Prometheus expects; a file left by a
    process of an earlier run whose pid is reused would otherwise be continued.
    """
    path = multiprocess_dir()
    if path is None or not path.is_dir():
        return 0
    found = sorted(path.glob("*.db"))
    for db in found:
        db.unlink(missing_ok=True)
    return len(found)
