"""Synthetic, valid source-v1 submissions for the benchmarks (no real patient data).

Every generator takes an index and returns a distinct submission: distinct record ids (so the
mapped FHIR ids differ), a distinct MRN and names, so nothing is ever a re-post.

- `medicine_session(i)`: the shipped medicine-session fixture (initial and supplemental dose,
  vitals, adverse events, a CAPS-5 score): 27 resources.
- `preparation_session(i)` / `integration_session(i)`: a session with its therapists and a
  PCL-5 (integration: also CAPS-5) score.
- `realistic_mix(i)`: one medicine session for every preparation and integration session
  pair, the proportions of a course (3 preparation, 2-3 medicine, ~9 integration sessions
  are typical; we weigh them 1 : 1 : 1 per submission, since a medicine session is one
  submission carrying far more records).
- `small(i)`: a patient and one vital-sign record (heart rate, blood pressure, temperature)
  in its session: the API benchmark's body; 8 resources.
- `wide(i, records)`: one submission whose medicine session has `records` vital-sign records
  (the scaling benchmark).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FIXTURE: dict[str, Any] = json.loads(
    (ROOT / "mappings/fixtures/medicine-session.in.json").read_text(encoding="utf-8")
)
_ID_PREFIXES = ('"p-', '"s-', '"d-', '"v-', '"ae-', '"a-', '"t-')


def _distinct(doc: dict[str, Any], i: int) -> dict[str, Any]:
    text = json.dumps(doc)
    for prefix in _ID_PREFIXES:
        text = text.replace(prefix, f"{prefix}{i}-")
    out: dict[str, Any] = json.loads(text)
    patient = out["patient"]
    patient["mrn"] = f"MRN-B{i:08d}"
    patient["studySubjectId"] = f"BENCH-{i:08d}"
    patient["name"] = {"family": f"Synthetic-{i}", "given": ["Bench"]}
    return out


def medicine_session(i: int) -> dict[str, Any]:
    return _distinct(FIXTURE, i)


def _session_only(i: int, kind: str, number: int, instruments: list[str]) -> dict[str, Any]:
    doc = copy.deepcopy(FIXTURE)
    for key in ("doses", "vitals", "adverseEvents"):
        doc.pop(key, None)
    doc["sessions"] = [
        {
            "id": f"s-{kind}-{number}",
            "type": kind,
            "number": number,
            "status": "completed",
            "start": "2026-02-20T10:00:00-05:00",
            "end": "2026-02-20T11:30:00-05:00",
            "therapists": ["t-lead", "t-co"],
        }
    ]
    doc["assessments"] = [
        {
            "id": f"a-{kind}-{n}",
            "instrument": instrument,
            "score": 30 + n,
            "date": "2026-02-20",
            "rater": "t-co",
        }
        for n, instrument in enumerate(instruments)
    ]
    return _distinct(doc, i)


def preparation_session(i: int) -> dict[str, Any]:
    return _session_only(i, "preparation", 1, ["PCL-5"])


def integration_session(i: int) -> dict[str, Any]:
    return _session_only(i, "integration", 1, ["PCL-5", "CAPS-5"])


def realistic_mix(i: int) -> dict[str, Any]:
    kind = i % 3
    if kind == 0:
        return medicine_session(i)
    return preparation_session(i) if kind == 1 else integration_session(i)


def small(i: int) -> dict[str, Any]:
    sessions = copy.deepcopy(FIXTURE["sessions"])
    sessions[0]["therapists"] = []  # no practitioner records: a patient and one vital sign
    doc = {
        "source": FIXTURE["source"],
        "patient": copy.deepcopy(FIXTURE["patient"]),
        "sessions": sessions,
        "vitals": [copy.deepcopy(FIXTURE["vitals"][0])],
    }
    return _distinct(doc, i)


def wide(i: int, records: int) -> dict[str, Any]:
    """A medicine session with `records` vital-sign records, 5 minutes apart (wrapping)."""
    doc = copy.deepcopy(FIXTURE)
    for key in ("doses", "adverseEvents"):
        doc.pop(key, None)
    template = FIXTURE["vitals"][1]
    vitals = []
    for n in range(records):
        minutes = 15 + (n * 5) % 420
        vital = copy.deepcopy(template)
        vital["id"] = f"v-{n}"
        vital["takenAt"] = f"2026-03-02T{9 + minutes // 60:02d}:{minutes % 60:02d}:00-05:00"
        vital.pop("timepoint", None)
        vitals.append(vital)
    doc["vitals"] = vitals
    return _distinct(doc, i)
