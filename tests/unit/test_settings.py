"""Settings from FHIRBRIDGE_<NAME>_FILE (Docker/Kubernetes secrets): read, one trailing newline
removed, never both ways at once, and a file that cannot be read is named but never shown."""

from __future__ import annotations

import hashlib
import json
import traceback
from pathlib import Path

import pytest
from pydantic_settings import SettingsError

from fhirbridge.settings import ApiKey, Settings

SECRET = "s3cret-session-key-7d41"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("UI_SESSION_SECRET", "AUTH_API_KEYS", "PAGE_SIZE"):
        monkeypatch.delenv(f"FHIRBRIDGE_{name}", raising=False)
        monkeypatch.delenv(f"FHIRBRIDGE_{name}_FILE", raising=False)


def _cause(exc: pytest.ExceptionInfo[SettingsError]) -> str:
    """What a person sees: the whole traceback, cause included."""
    return "".join(traceback.format_exception(exc.value))


def test_value_is_read_from_the_file_without_its_trailing_newline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "session"
    secret.write_text(SECRET + "\n")
    monkeypatch.setenv("FHIRBRIDGE_UI_SESSION_SECRET_FILE", str(secret))
    assert Settings().ui_session_secret == SECRET


def test_only_one_trailing_newline_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "session"
    secret.write_text(f" {SECRET}\n\n")
    monkeypatch.setenv("FHIRBRIDGE_UI_SESSION_SECRET_FILE", str(secret))
    assert Settings().ui_session_secret == f" {SECRET}\n"


def test_typed_and_json_values_come_from_files_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    digest = hashlib.sha256(b"key").hexdigest()
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps([{"client_id": "ehr", "sha256": digest, "scopes": ["fhir.read"]}]))
    size = tmp_path / "page"
    size.write_text("25\n")
    monkeypatch.setenv("FHIRBRIDGE_AUTH_API_KEYS_FILE", str(keys))
    monkeypatch.setenv("FHIRBRIDGE_PAGE_SIZE_FILE", str(size))
    settings = Settings()
    assert settings.auth_api_keys == (
        ApiKey(client_id="ehr", sha256=digest, scopes=("fhir.read",)),
    )
    assert settings.page_size == 25


def test_setting_both_the_variable_and_the_file_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "session"
    secret.write_text(SECRET)
    monkeypatch.setenv("FHIRBRIDGE_UI_SESSION_SECRET_FILE", str(secret))
    monkeypatch.setenv("FHIRBRIDGE_UI_SESSION_SECRET", "other")
    with pytest.raises(SettingsError) as caught:
        Settings()
    assert (
        "set FHIRBRIDGE_UI_SESSION_SECRET or FHIRBRIDGE_UI_SESSION_SECRET_FILE, not both"
        in _cause(caught)
    )
    assert SECRET not in _cause(caught)


def test_a_missing_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nowhere" / "session"
    monkeypatch.setenv("FHIRBRIDGE_UI_SESSION_SECRET_FILE", str(missing))
    with pytest.raises(SettingsError) as caught:
        Settings()
    assert (
        f"FHIRBRIDGE_UI_SESSION_SECRET_FILE: cannot read {missing}: No such file or directory"
        in _cause(caught)
    )


def test_an_unreadable_file_shows_its_path_never_its_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not UTF-8: the decoder's own error would carry the file's bytes into the traceback.
    secret = tmp_path / "session"
    secret.write_bytes(b"\xff" + SECRET.encode())
    monkeypatch.setenv("FHIRBRIDGE_UI_SESSION_SECRET_FILE", str(secret))
    with pytest.raises(SettingsError) as caught:
        Settings()
    shown = _cause(caught)
    assert f"FHIRBRIDGE_UI_SESSION_SECRET_FILE: {secret} is not UTF-8 text" in shown
    assert SECRET not in shown


def test_a_directory_is_not_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FHIRBRIDGE_UI_SESSION_SECRET_FILE", str(tmp_path))
    with pytest.raises(SettingsError) as caught:
        Settings()
    assert f"cannot read {tmp_path}: Is a directory" in _cause(caught)
