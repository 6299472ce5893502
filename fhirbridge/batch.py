"""Map many submissions in one run: NDJSON in (one submission per line), NDJSON or a Bundle out.

Memory stays bounded: one line is read, mapped, validated and written before the next. A bad
line is reported with its line number and the run goes on. Bundle output keeps only the set of
(type, id) already written, so a resource shared by several submissions (a Practitioner, a
Medication) appears once, as a transaction requires; NDJSON output keeps nothing, and a shared
resource appears once per submission that produces it (each line is an idempotent upsert by id).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO, Any

import orjson

from fhirbridge.errors import FhirbridgeError
from fhirbridge.fhir.validate import OutputValidator
from fhirbridge.mapping.expr import Unmapped
from fhirbridge.mapping.pack import MappingPack
from fhirbridge.pipeline import transform
from fhirbridge.validation import SubmissionValidator


@dataclass
class LineError:
    """The problems of one input line, located by line number and JSON path (no values)."""

    line: int
    problems: list[str]


@dataclass
class BatchStats:
    submissions: int = 0
    failed: int = 0
    resources: int = 0
    errors: list[LineError] = field(default_factory=list)
    unmapped: dict[str, int] = field(default_factory=dict)


def map_lines(
    lines: Iterable[bytes],
    out: IO[bytes],
    *,
    pack: MappingPack,
    now: Callable[[], datetime],
    output: str = "ndjson",
    on_line: Callable[[int, int], None] | None = None,
    on_error: Callable[[LineError], None] | None = None,
) -> BatchStats:
    """Map each non-blank line; write resources as NDJSON or one transaction Bundle to `out`.

    `on_line(line_number, bytes_read)` drives a progress display; `on_error` reports a bad line
    as soon as it is seen. Errors are also kept (line and paths only) in the returned stats.
    """
    input_validator = SubmissionValidator(pack.source_schema, pack.integrity)
    output_validator = OutputValidator()
    stats = BatchStats()
    seen: set[tuple[str, str]] = set()
    first_entry = True
    head = b'{"resourceType":"Bundle","type":"transaction","entry":['
    for number, raw in enumerate(lines, start=1):
        if on_line is not None:
            on_line(number, len(raw))
        if not raw.strip():
            continue
        stats.submissions += 1
        problems: list[str] | None = None
        resources: list[dict[str, Any]] = []
        try:
            document = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            problems = [f"malformed JSON at column {exc.colno}"]
        else:
            try:
                result = transform(
                    document,
                    pack=pack,
                    input_validator=input_validator,
                    output_validator=output_validator,
                    now=now(),
                )
                resources = result.resources
                _count_unmapped(stats, result.unmapped)
            except FhirbridgeError as exc:
                problems = [
                    f"{', '.join(i.expression) or '-'}: {i.diagnostics}" for i in exc.issues
                ]
        if problems is not None:
            stats.failed += 1
            error = LineError(number, problems)
            stats.errors.append(error)
            if on_error is not None:
                on_error(error)
            continue
        for resource in resources:
            if output == "ndjson":
                out.write(orjson.dumps(resource, option=orjson.OPT_APPEND_NEWLINE))
                stats.resources += 1
                continue
            key = (resource["resourceType"], resource["id"])
            if key in seen:
                continue
            seen.add(key)
            entry = {
                "fullUrl": f"urn:uuid:{resource['id']}",
                "resource": resource,
                "request": {"method": "PUT", "url": f"{key[0]}/{key[1]}"},
            }
            # The header goes out with the first entry: FHIR forbids an empty entry array.
            out.write((head if first_entry else b",") + orjson.dumps(entry))
            first_entry = False
            stats.resources += 1
    if output == "bundle":
        out.write(b'{"resourceType":"Bundle","type":"transaction"}\n' if first_entry else b"]}\n")
    return stats


def _count_unmapped(stats: BatchStats, unmapped: list[Unmapped]) -> None:
    for u in unmapped:
        stats.unmapped[u.table] = stats.unmapped.get(u.table, 0) + 1
