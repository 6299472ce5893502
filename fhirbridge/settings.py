"""Typed, frozen settings: the only module that reads the environment (FHIRBRIDGE_*)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_mappings_dir() -> Path:
    """The shipped pack: beside the package in a checkout, else ./mappings (container, wheel)."""
    beside = Path(__file__).resolve().parent.parent / "mappings"
    return beside if (beside / "pack.yaml").is_file() else Path.cwd() / "mappings"


def default_database_url() -> str:
    """SQLite file in the working directory: the embedded default, nothing to install."""
    return f"sqlite:///{Path.cwd() / 'fhirbridge.db'}"


class Settings(BaseSettings):
    """Service configuration; every field is FHIRBRIDGE_<NAME> in the environment."""

    model_config = SettingsConfigDict(env_prefix="FHIRBRIDGE_", frozen=True, extra="ignore")

    database_url: str = Field(default_factory=default_database_url)
    mappings_dir: Path = Field(default_factory=default_mappings_dir)
    base_url: str = Field(
        default="",
        description="Public base URL of the FHIR API (for fullUrl and paging links); "
        "empty means derived from each request.",
    )
    page_size: int = Field(default=50, ge=1, le=1000)
    max_page_size: int = Field(default=500, ge=1, le=5000)
    max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    log_level: str = "INFO"
    targets: Path | None = Field(
        default=None,
        description="YAML file of hospital FHIR servers to deliver to (FHIRBRIDGE_TARGETS); "
        "none: resources are stored and served, not delivered.",
    )
    jwks_path: str = Field(
        default="/.well-known/jwks.json",
        pattern=r"^/[A-Za-z0-9._~/-]*$",
        description="Where our SMART Backend Services public keys are published (JWKS).",
    )
    worker_idle_seconds: float = Field(default=1.0, gt=0, le=60)
    worker_lease_seconds: float = Field(
        default=120.0,
        ge=1,
        le=3600,
        description="How long a worker holds claimed deliveries; after a crash they are due "
        "again once it runs out. Longer than the slowest target's timeout.",
    )
