"""Shared by the console tests: API keys, an app with one target, PHI of the fixture, forms.

``make_app`` builds the real app (SQLite file, a targets file, API keys with sync.admin,
fhir.read and submissions.write). ``PHI`` lists values of the medicine-session fixture that
must never appear in a console page: names, MRN, study id, birth date, NPI, source record ids
and every free-text field.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flask import Flask

from fhirbridge import create_app
from fhirbridge.auth.apikeys import entry
from fhirbridge.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOC: dict[str, Any] = json.loads((ROOT / "mappings/fixtures/medicine-session.in.json").read_text())

ADMIN_KEY = "fbk_" + secrets.token_urlsafe(32)  # sync.admin
READER_KEY = "fbk_" + secrets.token_urlsafe(32)  # fhir.read only
SUBMITTER_KEY = "fbk_" + secrets.token_urlsafe(32)  # submissions.write
SESSION_SECRET = secrets.token_urlsafe(32)
KEYS = (
    entry(ADMIN_KEY, "ops-admin", ["sync.admin"]),
    entry(READER_KEY, "ehr-reader", ["fhir.read"]),
    entry(SUBMITTER_KEY, "clinic-a", ["submissions.write"]),
)

_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _phi(doc: dict[str, Any]) -> list[str]:
    patient = doc["patient"]
    values = [
        patient["mrn"],
        patient["studySubjectId"],
        patient["name"]["family"],
        *patient["name"]["given"],
        patient["birthDate"],
        patient["id"],
    ]
    for practitioner in doc["practitioners"]:
        values += [practitioner["name"]["family"], *practitioner["name"]["given"]]
        values += [practitioner["npi"]] if "npi" in practitioner else []
    values += [s["id"] for s in doc["sessions"]] + [d["lotNumber"] for d in doc["doses"]]
    values += [s for s in _strings(doc) if " " in s]  # free text: notes, descriptions, rooms
    return sorted(v for v in set(values) if len(v) >= 5)  # "Test" would match anything


PHI = _phi(DOC)


def assert_no_phi(html: str) -> None:
    leaked = [value for value in PHI if value in html]
    assert not leaked, f"patient data in the page: {leaked}"


def csrf_of(html: str) -> str:
    found = _CSRF.search(html)
    assert found, "no CSRF field in the page"
    return found.group(1)


def targets_file(path: Path, base_url: str, resource_types: list[str] | None = None) -> Path:
    target: dict[str, Any] = {"name": "research-store", "base_url": base_url}
    target["profile"] = "generic-r4"
    if resource_types is not None:
        target["resource_types"] = resource_types
    path.write_text(json.dumps({"targets": [target]}))
    return path


def make_app(
    tmp_path: Path,
    *,
    base_url: str = "http://127.0.0.1:9/fhir",
    resource_types: list[str] | None = None,
    keys: tuple[dict[str, Any], ...] | None = KEYS,
    **settings: Any,
) -> Flask:
    return create_app(
        Settings(
            database_url=f"sqlite:///{tmp_path / 'fhirbridge.db'}",
            mappings_dir=ROOT / "mappings",
            targets=targets_file(tmp_path / "targets.json", base_url, resource_types),
            auth_api_keys=keys or (),
            ui_session_secret=SESSION_SECRET,
            db_auto_upgrade=True,
            **settings,
        )
    )
