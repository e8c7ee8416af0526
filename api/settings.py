"""Configuration of the API: environment variables under GPUDELIVERY_API_.

The database is the exception: `GPUDELIVERY_DATABASE_URL`, shared with `gpudelivery api
migrate` and any tool that reaches the same database. Only this module reads the
environment.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["DEFAULT_DATABASE_URL", "ApiSettings"]

# The embedded default: one SQLite file in the working directory.
DEFAULT_DATABASE_URL = "sqlite:///gpudelivery.sqlite3"


class ApiSettings(BaseSettings):
    """Everything the API can be told."""

    model_config = SettingsConfigDict(env_prefix="GPUDELIVERY_API_", extra="forbid")

    database_url: str = Field(
        default=DEFAULT_DATABASE_URL,
        validation_alias=AliasChoices("GPUDELIVERY_DATABASE_URL", "database_url"),
        description="SQLAlchemy URL: sqlite:///FILE (default) or "
        "postgresql+psycopg://USER@HOST:PORT/DB.",
    )
    provider_key_file: Path = Field(
        default=Path("provider.key"),
        description="The provider's Ed25519 key (PEM PKCS#8) that signs proofs and tree "
        "heads; created there on first start when missing.",
    )
    bootstrap_token_file: Path | None = Field(
        default=None,
        description="File holding the bootstrap token with which meters register their "
        "keys; unset: meter registration is refused.",
    )
    max_body_bytes: int = Field(
        default=8 << 20, ge=1 << 10, description="Larger request bodies answer 413."
    )
    jobs_enabled: bool = Field(
        default=True,
        description="Run the periodic jobs (tree heads, finalization, outbox, stale meters); "
        "with several replicas one leads them (a PostgreSQL advisory lock).",
    )
    finalize_grace_s: int = Field(
        default=300,
        ge=0,
        le=86_400,
        description="Seconds after a window's end before its proof is final: batches "
        "still in flight arrive first.",
    )
    webhook_timeout_s: float = Field(
        default=10.0, gt=0, le=120, description="Timeout of one webhook delivery."
    )
