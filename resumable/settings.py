"""One settings object for the whole project, read from `RESUMABLE_*` variables.

The defaults need no service: metadata in SQLite and checkpoints in a folder,
both under `RESUMABLE_DATA_DIR` (`./.resumable`). Production points
`RESUMABLE_DATABASE_URL` at PostgreSQL (`postgresql+psycopg://...`) and
`RESUMABLE_CHECKPOINT_URL` at any fsspec URL (`s3://bucket/prefix`, ...).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RESUMABLE_", extra="ignore")

    data_dir: Path = Field(
        default=Path(".resumable"), description="Folder for the embedded defaults."
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the metadata database; SQLite under data_dir if unset.",
    )
    checkpoint_url: str | None = Field(
        default=None,
        description="fsspec URL of the checkpoint root; a folder under data_dir if unset.",
    )
    api_token: SecretStr | None = Field(
        default=None, description="Bearer token the operations API requires."
    )
    train_deployment: str = "train-model/gpu"
    resume_deployment: str = "resume-training/default"
    stale_save_seconds: float = Field(
        default=3600.0,
        gt=0,
        description="A save still staging after this long belongs to a dead writer.",
    )
    claim_ttl_seconds: float = Field(
        default=600.0,
        gt=0,
        description="A resume claim that scheduled nothing after this long may be taken over.",
    )
    heartbeat_seconds: float = Field(
        default=10.0,
        gt=0,
        description="How often a training run reports that it is alive (`resumable.training.heartbeat`).",
    )
    auto_resume_cap: int = Field(
        default=3, ge=0, description="Automatic resumes allowed per operation."
    )

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'resumable.db').resolve()}"

    def resolved_checkpoint_url(self) -> str:
        if self.checkpoint_url:
            return self.checkpoint_url
        return (self.data_dir / "checkpoints").resolve().as_uri()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once; tests build their own `Settings`."""
    return Settings()
