"""The pure pipeline: validate the submission → map it → validate every output resource.

No I/O: the clock comes in as `now`; storing is the caller's business (api/submissions.py).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fhirbridge.errors import InputInvalidError, Issue, OutputInvalidError
from fhirbridge.fhir.validate import OutputValidator
from fhirbridge.mapping.engine import MapResult, map_submission
from fhirbridge.mapping.pack import MappingPack
from fhirbridge.validation import SubmissionValidator


def transform(
    document: Any,
    *,
    pack: MappingPack,
    input_validator: SubmissionValidator,
    output_validator: OutputValidator,
    now: datetime,
    trace: bool = False,
) -> MapResult:
    """Map one submission to validated FHIR R4 resources, or raise with every problem listed."""
    issues = input_validator.validate(document)
    if issues:
        raise InputInvalidError("the submission is invalid", issues)
    result = map_submission(pack, document, now=now, trace=trace)
    problems: list[Issue] = []
    for produced in result.produced:
        for issue in output_validator.validate(produced.resource):
            # Say which rule made the bad element and from which record: the integrator's fix.
            problems.append(
                Issue(
                    f"rule {produced.rule!r} (record {produced.record_path}) produced invalid "
                    f"FHIR: {issue.diagnostics}",
                    issue.expression,
                    code="processing",
                )
            )
    if problems:
        raise OutputInvalidError("the mapping produced FHIR that fails validation", problems)
    return result


def summary(result: MapResult) -> dict[str, Any]:
    """The JSON summary answered for a submission: its id and, per record, what it produced."""
    out: dict[str, Any] = {
        "submissionId": result.submission_id,
        "source": result.source,
        "records": result.records(),
    }
    if result.unmapped:
        counts: dict[str, int] = {}
        for u in result.unmapped:
            counts[u.table] = counts.get(u.table, 0) + 1
        # Counted, never silently dropped: the terms stay as text in the resources.
        out["unmappedTerms"] = [{"table": t, "count": n} for t, n in sorted(counts.items())]
    return out
