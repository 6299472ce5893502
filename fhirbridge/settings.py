"""Typed, frozen settings: the only module that reads the environment (FHIRBRIDGE_*).

Every setting can also come from a file: FHIRBRIDGE_<NAME>_FILE names a file whose content
(one trailing newline removed) is the value, for secrets mounted by Docker or Kubernetes.
Setting both FHIRBRIDGE_<NAME> and FHIRBRIDGE_<NAME>_FILE is an error, never a silent choice.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

ENV_PREFIX = "FHIRBRIDGE_"


def default_mappings_dir() -> Path:
    """The shipped pack: beside the package in a checkout, else ./mappings (container, wheel)."""
    beside = Path(__file__).resolve().parent.parent / "mappings"
    return beside if (beside / "pack.yaml").is_file() else Path.cwd() / "mappings"


def default_database_url() -> str:
    """SQLite file in the working directory: the embedded default, nothing to install."""
    return f"sqlite:///{Path.cwd() / 'fhirbridge.db'}"


class ApiKey(BaseModel):
    """One accepted API key: only its SHA-256 is configured, never the key itself."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    client_id: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 of the key")
    scopes: tuple[Literal["submissions.write", "fhir.read", "sync.admin"], ...] = ()


class FileSecretsSource(EnvSettingsSource):
    """FHIRBRIDGE_<NAME>_FILE: the value is read from that file (Docker/Kubernetes secrets)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        env_name = f"{ENV_PREFIX}{field_name.upper()}"
        path = os.environ.get(f"{env_name}_FILE")
        if not path:
            return None, field_name, False
        if env_name in os.environ:
            raise ValueError(f"set {env_name} or {env_name}_FILE, not both")
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            # The path is configuration, not a secret; the content is never shown.
            raise ValueError(f"{env_name}_FILE: cannot read {path}: {exc.strerror}") from None
        except UnicodeDecodeError:  # its repr would carry the file's bytes: the secret
            raise ValueError(f"{env_name}_FILE: {path} is not UTF-8 text") from None
        return text.removesuffix("\n"), field_name, self.field_is_complex(field)


class Settings(BaseSettings):
    """Service configuration; every field is FHIRBRIDGE_<NAME> in the environment."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, FileSecretsSource(settings_cls))

    database_url: str = Field(
        default_factory=default_database_url,
        description="SQLAlchemy URL of the database: sqlite:///path (one machine) or "
        "postgresql+psycopg://user@host/db (several instances).",
    )
    mappings_dir: Path = Field(
        default_factory=default_mappings_dir, description="The mapping pack folder to load."
    )
    base_url: str = Field(
        default="",
        description="Public base URL of the FHIR API (for fullUrl and paging links); "
        "empty means derived from each request.",
    )
    page_size: int = Field(
        default=50, ge=1, le=1000, description="FHIR search page size when _count is not given."
    )
    max_page_size: int = Field(
        default=500,
        ge=1,
        le=5000,
        description="Largest FHIR search page: a larger _count is lowered to it.",
    )
    max_body_bytes: int = Field(
        default=10 * 1024 * 1024,
        ge=1024,
        description="Largest request body in bytes (10 MiB); larger ones are refused with 413.",
    )
    log_level: str = Field(
        default="INFO", description="Least severe log level written (DEBUG, INFO, WARNING, …)."
    )
    targets: Path | None = Field(
        default=None,
        description="YAML file of hospital FHIR servers to deliver to; "
        "none: resources are stored and served, not delivered.",
    )
    jwks_path: str = Field(
        default="/.well-known/jwks.json",
        pattern=r"^/[A-Za-z0-9._~/-]*$",
        description="Where our SMART Backend Services public keys are published (JWKS).",
    )
    worker_idle_seconds: float = Field(
        default=1.0, gt=0, le=60, description="How long a sync worker rests when nothing is due."
    )
    worker_concurrency: int = Field(
        default=1,
        ge=1,
        le=16,
        description="Deliveries a `fhirbridge worker` process has in flight at once (one "
        "patient each, spread over the targets). More keeps a fast EHR busy while fhirbridge "
        "plans the next request; ask the hospital how many concurrent clients it allows.",
    )
    worker_lease_seconds: float = Field(
        default=120.0,
        ge=1,
        le=3600,
        description="How long a worker holds claimed deliveries; after a crash they are due "
        "again once it runs out. Longer than the slowest target's timeout.",
    )

    # --- database -------------------------------------------------------------------------
    db_auto_upgrade: bool = Field(
        default=False,
        description="Apply pending Alembic migrations at start-up. Off: the service refuses to "
        "start against a database behind the latest migration (run `fhirbridge db upgrade`).",
    )

    # --- inbound authentication -----------------------------------------------------------
    auth_api_keys: tuple[ApiKey, ...] = Field(
        default=(),
        description="Accepted API keys as JSON: [{client_id, sha256, scopes}]. Several per "
        "client for rotation. `fhirbridge auth new-key` makes a key and its entry.",
    )
    auth_jwt_jwks_url: str = Field(
        default="", description="JWKS URL of the OAuth2 authorization server (bearer JWTs)."
    )
    auth_jwt_public_key: str = Field(
        default="", description="PEM public key for bearer JWTs, instead of a JWKS URL."
    )
    auth_jwt_issuer: str = Field(default="", description="Required `iss` of bearer JWTs.")
    auth_jwt_audience: str = Field(default="", description="Required `aud` of bearer JWTs.")
    auth_jwt_algorithms: tuple[Literal["RS256", "ES256"], ...] = Field(
        default=("RS256", "ES256"), min_length=1, description="Accepted JWT signature algorithms."
    )
    auth_jwt_leeway_seconds: int = Field(
        default=30, ge=0, le=300, description="Clock skew allowed on exp and nbf."
    )

    # --- abuse limits ---------------------------------------------------------------------
    max_json_depth: int = Field(
        default=64,
        ge=8,
        le=256,
        description="Deepest JSON nesting accepted in a request body (at most 256: the R4 "
        "schema validator stops there).",
    )
    max_array_length: int = Field(
        default=10_000, ge=10, description="Longest JSON array accepted in a request body."
    )
    rate_limit: str = Field(
        default="1200/minute",
        description="Requests per client (authenticated id, else address), in the limits "
        "notation ('100/second;1200/minute'); empty disables.",
    )
    rate_limit_storage_url: str = Field(
        default="memory://",
        description="Where rate-limit counters live: memory:// (one process) or "
        "redis://host:6379 (shared by every instance and gunicorn worker).",
    )

    # --- observability and console --------------------------------------------------------
    log_format: Literal["json", "text"] = Field(
        default="json", description="json: one JSON object per line (production); text: dev."
    )
    ui_session_secret: str = Field(
        default="",
        description="Key that signs ops-console sessions; set it (same value on every "
        "instance) when more than one process serves /ui. Empty: random per process.",
    )
