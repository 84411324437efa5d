"""Database tables, as SQLAlchemy 2 typed models. Schemas for the edges live in `resumable.schemas`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them without an offset)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(
        self, value: datetime | None, dialect: Dialect
    ) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(
                f"naive datetime {value!r}: store timezone-aware UTC datetimes"
            )
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(
        self, value: datetime | None, dialect: Dialect
    ) -> datetime | None:
        if value is None:
            return None
        return (
            value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        )


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, datetime: UTCDateTime}


class Operation(Base):
    """One training operation: the chain of flow runs that trains one spec.

    The resume claim lives here: `claimed_run_id` names the interrupted attempt whose
    resume has been taken, and it is only ever set by a conditional UPDATE.
    """

    __tablename__ = "operations"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    spec: Mapped[dict[str, Any]]
    fingerprint: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    latest_run_id: Mapped[str | None] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    last_known_state: Mapped[str] = mapped_column(String(32), default="RUNNING")
    trainer_run_id: Mapped[str | None] = mapped_column(String(64))
    claimed_run_id: Mapped[str | None] = mapped_column(String(64))
    claim_owner: Mapped[str | None] = mapped_column(String(200))
    claimed_at: Mapped[datetime | None]
    continuation_run_id: Mapped[str | None] = mapped_column(String(64))
    auto_resumes: Mapped[int] = mapped_column(Integer, default=0)


class Attempt(Base):
    """One flow run of an operation; the first attempt's id is the operation's id."""

    __tablename__ = "attempts"

    flow_run_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    operation_id: Mapped[str] = mapped_column(ForeignKey("operations.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    resumed_from_checkpoint_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # The machine that last ran this attempt (a Retry may run it again elsewhere).
    host: Mapped[str | None] = mapped_column(String(255))


class Checkpoint(Base):
    """A checkpoint's metadata. Only rows in status `committed` are ever loaded."""

    __tablename__ = "checkpoints"
    __table_args__ = (
        Index("ix_checkpoints_latest", "operation_id", "status", "step", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    operation_id: Mapped[str] = mapped_column(String(64))
    flow_run_id: Mapped[str | None] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    epoch: Mapped[int] = mapped_column(Integer)
    batch: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    committed_at: Mapped[datetime | None]
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(16), default="staging")
    status_reason: Mapped[str | None] = mapped_column(Text)
    manifest_sha256: Mapped[str | None] = mapped_column(String(64))
    fingerprint: Mapped[str] = mapped_column(String(64))
