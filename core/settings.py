"""Service configuration (pydantic-settings, prefix ``DPC_``).

The embedded default keeps everything under ``DPC_DATA_DIR``: a SQLite file, the
Redis socket of the bundled redis-server, datasets and artifacts. Production
(``DPC_ENV=production``) refuses SQLite and a missing or default API key.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

INSECURE_KEYS = {"", "changeme", "dev", "test", "secret"}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DPC_", extra="ignore")

    env: Literal["dev", "production"] = "dev"
    data_dir: Path = Path("var")
    database_url: str | None = Field(None, description="default: sqlite under data_dir")
    broker_url: str | None = Field(None, description="default: embedded redis under data_dir")
    artifact_dir: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    bootstrap_api_key: str | None = None
    max_upload_mb: float = 50.0
    allow_tiny_models: bool = True
    job_lease_seconds: int = 120
    heartbeat_seconds: int = 10
    visibility_timeout_seconds: int = 43_200
    charge_ahead_steps: int = 10
    checkpoint_every_steps: int = 50
    device: str = "auto"

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> Settings:
        if self.env == "production":
            if self.resolved_database_url.startswith("sqlite"):
                raise ValueError("DPC_ENV=production refuses SQLite: set DPC_DATABASE_URL "
                                 "to a PostgreSQL URL")
            if self.bootstrap_api_key is not None and self.bootstrap_api_key in INSECURE_KEYS:
                raise ValueError("DPC_ENV=production refuses a default DPC_BOOTSTRAP_API_KEY")
            if not self.broker_url:
                raise ValueError("DPC_ENV=production needs DPC_BROKER_URL (Redis)")
        return self

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'dpc.sqlite3').absolute()}"

    @property
    def embedded_redis_socket(self) -> Path:
        return (self.data_dir / "redis.sock").absolute()

    @property
    def resolved_broker_url(self) -> str:
        if self.broker_url:
            return self.broker_url
        return f"redis+socket://{self.embedded_redis_socket}"

    @property
    def datasets_dir(self) -> Path:
        return self.data_dir / "datasets"

    @property
    def artifacts_dir(self) -> Path:
        return self.artifact_dir or (self.data_dir / "artifacts")

    @property
    def jobs_dir(self) -> Path:
        """Per-job private work areas (checkpoints, synthetic text)."""
        return self.data_dir / "jobs"

    @property
    def model_cache_dir(self) -> Path:
        return self.data_dir / "model-cache"


@lru_cache
def get_settings() -> Settings:
    return Settings()
