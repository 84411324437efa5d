"""Operations as people see them, shared by the HTTP API and the CLI so that both answer alike.

An operation's status is its latest attempt's state in Prefect. When Prefect cannot be
reached, listings fall back to the last state the ledger saw (and say so); anything that
changes an operation (resume, cancel) refuses with `OrchestratorUnavailable` instead.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy.orm import Session, sessionmaker

from resumable import operations
from resumable.checkpoints.store import CheckpointRecord, CheckpointStore
from resumable.errors import NotCancellable
from resumable.models import Operation
from resumable.resuming import (
    RESUMABLE_STATES,
    OrchestratorUnavailable,
    Resumer,
    ResumeResult,
    RunGateway,
)
from resumable.settings import Settings

CANCELLABLE_STATES = {"RUNNING", "SCHEDULED", "PENDING", "PAUSED"}


class CheckpointView(BaseModel):
    id: str
    kind: str
    epoch: int
    batch: int
    step: int
    created_at: datetime
    size_bytes: int
    status: str
    metrics: dict[str, Any]
    flow_run_id: str | None

    @classmethod
    def of(cls, record: CheckpointRecord) -> CheckpointView:
        return cls(
            id=record.id,
            kind=record.kind,
            epoch=record.epoch,
            batch=record.batch,
            step=record.step,
            created_at=record.created_at,
            size_bytes=record.size_bytes,
            status=record.status,
            metrics=record.metrics,
            flow_run_id=record.flow_run_id,
        )


class AttemptView(BaseModel):
    number: int
    flow_run_id: str
    resumed_from_checkpoint_id: str | None
    host: str | None


class OperationView(BaseModel):
    id: str
    status: str
    status_source: str  # "prefect", or "ledger" when Prefect could not be reached
    resumable: bool
    recipe: str
    epochs: int
    latest_run_id: str | None
    attempts: int
    created_at: datetime
    updated_at: datetime
    latest_checkpoint: CheckpointView | None = None


class OperationDetail(OperationView):
    spec: dict[str, Any]
    attempt_runs: list[AttemptView]
    claim_owner: str | None
    continuation_run_id: str | None


class CancelResult(BaseModel):
    operation_id: str
    flow_run_id: str
    status: str


class OperationsService:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        store: CheckpointStore,
        gateway: RunGateway,
        settings: Settings,
    ) -> None:
        self.sessions = sessions
        self.store = store
        self.gateway = gateway
        self.resumer = Resumer(sessions, store, gateway, settings)

    def _status(self, operation: Operation, *, strict: bool) -> tuple[str, str]:
        try:
            state = self.gateway.flow_run_state(operation.latest_run_id or operation.id)
        except OrchestratorUnavailable:
            if strict:
                raise
            return operation.last_known_state, "ledger"
        return (state, "prefect") if state else (operation.last_known_state, "ledger")

    def _view(self, operation: Operation, *, strict: bool) -> dict[str, Any]:
        status, source = self._status(operation, strict=strict)
        latest = self.store.latest_good(operation.id)
        return {
            "id": operation.id,
            "status": status,
            "status_source": source,
            "resumable": status in RESUMABLE_STATES and latest is not None,
            "recipe": operation.spec.get("recipe", "?"),
            "epochs": operation.spec.get("epochs", 0),
            "latest_run_id": operation.latest_run_id,
            "attempts": operation.attempts,
            "created_at": operation.created_at,
            "updated_at": operation.updated_at,
            "latest_checkpoint": CheckpointView.of(latest) if latest else None,
        }

    def list_operations(
        self,
        *,
        status: str | None = None,
        resumable: bool | None = None,
        limit: int = 200,
    ) -> list[OperationView]:
        with self.sessions() as session:
            found = operations.list_operations(session=session, limit=limit)
        views = [
            OperationView(**self._view(operation, strict=False)) for operation in found
        ]
        if status is not None:
            views = [v for v in views if v.status == status.upper()]
        if resumable is not None:
            views = [v for v in views if v.resumable == resumable]
        return views

    def get(self, id_or_run: str) -> OperationDetail:
        with self.sessions() as session:
            operation = operations.get_operation(session=session, id_or_run=id_or_run)
            attempts = operations.list_attempts(
                session=session, operation_id=operation.id
            )
        return OperationDetail(
            **self._view(operation, strict=False),
            spec=operation.spec,
            attempt_runs=[
                AttemptView(
                    number=a.number,
                    flow_run_id=a.flow_run_id,
                    resumed_from_checkpoint_id=a.resumed_from_checkpoint_id,
                    host=a.host,
                )
                for a in attempts
            ],
            claim_owner=operation.claim_owner,
            continuation_run_id=operation.continuation_run_id,
        )

    def checkpoints(
        self, id_or_run: str, *, include_all: bool = False
    ) -> list[CheckpointView]:
        with self.sessions() as session:
            operation = operations.get_operation(session=session, id_or_run=id_or_run)
        return [
            CheckpointView.of(r)
            for r in self.store.list_checkpoints(operation.id, include_all=include_all)
        ]

    def cancel(self, id_or_run: str) -> CancelResult:
        with self.sessions() as session:
            operation = operations.get_operation(session=session, id_or_run=id_or_run)
        run = operation.latest_run_id or operation.id
        status, _ = self._status(operation, strict=True)
        if status not in CANCELLABLE_STATES:
            raise NotCancellable(
                f"operation {operation.id!r} is {status}: its latest attempt {run} has ended, so there is nothing to cancel"
            )
        return CancelResult(
            operation_id=operation.id, flow_run_id=run, status=self.gateway.cancel(run)
        )

    def resume(self, id_or_run: str, *, owner: str) -> ResumeResult:
        return self.resumer.resume(id_or_run, owner=owner)
