"""The one decision behind every resume, whichever surface asks (API, CLI, resume deployment).

In order, each step a method so the resume flow can run them as separate tasks:

1. `validate`: the operation exists and its latest attempt is CANCELLED, FAILED or CRASHED.
2. `claim`: one conditional UPDATE; exactly one concurrent request proceeds.
3. `verify_checkpoint`: the last good checkpoint is loaded and every hash checked, falling
   back past corrupted ones, before any GPU is asked for. A failure here gives the claim back.
4. `schedule`: a `train-model` run on the GPU pool's deployment, with an idempotency key
   derived from the interrupted attempt, so a rerun of a half-done resume cannot schedule twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from pydantic import BaseModel
from sqlalchemy.orm import Session, sessionmaker

from resumable import events, faults, operations
from resumable.checkpoints.store import CheckpointRecord, CheckpointStore
from resumable.errors import (
    CheckpointNotFound,
    InvalidSpec,
    NotResumable,
    OperationNotFound,
    ResumableError,
    ResumeConflict,
)
from resumable.settings import Settings

logger = logging.getLogger(__name__)

RESUMABLE_STATES = frozenset({"CANCELLED", "FAILED", "CRASHED"})


class OrchestratorUnavailable(ResumableError, ConnectionError):
    """The Prefect server cannot be reached; nothing was claimed or scheduled."""


class RunGateway(Protocol):
    """What resuming needs from the orchestrator (Prefect in production, a fake in unit tests)."""

    def flow_run_state(self, flow_run_id: str) -> str | None:
        """The state type of a flow run (`RUNNING`, `CANCELLED`, ...), or None if it does not exist."""
        ...

    def schedule_training(
        self,
        *,
        deployment: str,
        parameters: dict[str, Any],
        idempotency_key: str,
        tags: list[str],
    ) -> str:
        """Create a flow run of `deployment` (or return the one this key already made); its id."""
        ...

    def cancel(self, flow_run_id: str) -> str:
        """Ask for a flow run to be cancelled; its new state type."""
        ...

    def emit(
        self,
        event: str,
        operation_id: str,
        payload: dict[str, Any],
        flow_run_id: str | None = None,
    ) -> None:
        """Publish an event about an operation (see `resumable.events`); never raises."""
        ...


class ResumedFrom(BaseModel):
    checkpoint_id: str
    checkpoint_type: str
    created_at: datetime
    epoch: int
    batch: int


class ResumeResult(BaseModel):
    operation_id: str
    status: str
    flow_run_id: str
    interrupted_run_id: str
    attempt: int
    resumed_from: ResumedFrom


@dataclass(frozen=True)
class ResumeCandidate:
    operation_id: str
    interrupted_run_id: str
    state: str
    spec: dict[str, Any]
    attempt: int


def idempotency_key(operation_id: str, interrupted_run_id: str) -> str:
    return f"resume:{operation_id}:{interrupted_run_id}"


def resumed_from(record: CheckpointRecord) -> ResumedFrom:
    return ResumedFrom(
        checkpoint_id=record.id,
        checkpoint_type=record.kind,
        created_at=record.created_at,
        epoch=record.epoch,
        batch=record.batch,
    )


class Resumer:
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
        self.settings = settings

    def validate(self, id_or_run: str) -> ResumeCandidate:
        """Raises `OperationNotFound`, `NotResumable` or `ResumeConflict`; never changes anything."""
        with self.sessions() as session:
            operation = operations.get_operation(session=session, id_or_run=id_or_run)
            latest = operation.latest_run_id or operation.id
            candidate = ResumeCandidate(
                operation.id, latest, "", dict(operation.spec), operation.attempts
            )
            continuation, owner, known = (
                operation.continuation_run_id,
                operation.claim_owner,
                operation.last_known_state,
            )
        state = self.gateway.flow_run_state(latest) or known
        if state in RESUMABLE_STATES:
            return ResumeCandidate(
                candidate.operation_id, latest, state, candidate.spec, candidate.attempt
            )
        if continuation == latest and state in {"SCHEDULED", "PENDING", "RUNNING"}:
            raise ResumeConflict(
                candidate.operation_id, owner or "another request", continuation
            )
        advice = {
            "COMPLETED": "it finished; start a new operation to train further",
            "RUNNING": "cancel it first if you want it to stop",
            "CANCELLING": "wait until the cancellation has ended, then resume",
            "PAUSED": "resume it from the Prefect UI, or cancel it first",
        }.get(state, "wait until it ends, or cancel it first")
        raise NotResumable(
            candidate.operation_id,
            state,
            f"its latest attempt {latest} is {state}; {advice}",
        )

    def claim(
        self, candidate: ResumeCandidate, *, owner: str, automatic: bool = False
    ) -> None:
        with self.sessions.begin() as session:
            claim = operations.claim_resume(
                session=session,
                operation_id=candidate.operation_id,
                interrupted_run_id=candidate.interrupted_run_id,
                owner=owner,
                ttl_seconds=self.settings.claim_ttl_seconds,
                automatic=automatic,
                auto_cap=self.settings.auto_resume_cap,
            )
        if claim.won:
            logger.info(
                "operation %s: %s claimed the resume of %s",
                candidate.operation_id,
                owner,
                candidate.interrupted_run_id,
            )
            return
        if automatic and claim.auto_resumes >= self.settings.auto_resume_cap:
            raise NotResumable(
                candidate.operation_id,
                candidate.state,
                f"it reached its cap of {self.settings.auto_resume_cap} automatic resumes; resume it by hand",
            )
        raise ResumeConflict(
            candidate.operation_id,
            claim.owner or "another request",
            claim.continuation_run_id,
        )

    def verify_checkpoint(
        self, candidate: ResumeCandidate, *, owner: str
    ) -> CheckpointRecord:
        try:
            loaded = self.store.load_latest_good(candidate.operation_id)
        except CheckpointNotFound:
            with self.sessions.begin() as session:
                operations.release_claim(
                    session=session, operation_id=candidate.operation_id, owner=owner
                )
            raise
        for checkpoint_id, reason in loaded.skipped:
            logger.warning(
                "operation %s: skipped corrupted checkpoint %s: %s",
                candidate.operation_id,
                checkpoint_id,
                reason,
            )
            self.gateway.emit(
                events.CHECKPOINT_CORRUPTED,
                candidate.operation_id,
                {"checkpoint_id": checkpoint_id, "reason": reason},
            )
        return loaded.record

    def schedule(
        self, candidate: ResumeCandidate, record: CheckpointRecord, *, owner: str
    ) -> ResumeResult:
        attempt = candidate.attempt + 1
        flow_run_id = self.gateway.schedule_training(
            deployment=self.settings.train_deployment,
            parameters={
                "spec": candidate.spec,
                "resume": {
                    "operation_id": candidate.operation_id,
                    "checkpoint_id": record.id,
                },
            },
            idempotency_key=idempotency_key(
                candidate.operation_id, candidate.interrupted_run_id
            ),
            tags=[f"operation:{candidate.operation_id}", f"attempt:{attempt}"],
        )
        with self.sessions.begin() as session:
            operations.record_continuation(
                session=session,
                operation_id=candidate.operation_id,
                owner=owner,
                flow_run_id=flow_run_id,
                resumed_from_checkpoint_id=record.id,
            )
        logger.info(
            "operation %s: resumed from %s checkpoint %s (epoch %d, batch %d) as flow run %s",
            candidate.operation_id,
            record.kind,
            record.id,
            record.epoch,
            record.batch,
            flow_run_id,
        )
        result = ResumeResult(
            operation_id=candidate.operation_id,
            status="SCHEDULED",
            flow_run_id=flow_run_id,
            interrupted_run_id=candidate.interrupted_run_id,
            attempt=attempt,
            resumed_from=resumed_from(record),
        )
        self.gateway.emit(
            events.OPERATION_RESUMED,
            candidate.operation_id,
            result.model_dump(mode="json"),
            flow_run_id,
        )
        return result

    def refused(self, id_or_run: str, error: ResumableError, *, owner: str) -> None:
        """Publish a refused resume as an event (not for ids that name no operation)."""
        if isinstance(error, OperationNotFound | InvalidSpec):
            return
        operation_id = getattr(error, "operation_id", id_or_run)
        payload = {
            "reason": str(error),
            "error": type(error).__name__,
            "requested_by": owner,
        }
        self.gateway.emit(events.RESUME_REFUSED, operation_id, payload)

    def resume(
        self, id_or_run: str, *, owner: str, automatic: bool = False
    ) -> ResumeResult:
        """All four steps in one call, as the operations API and CLI use them."""
        try:
            candidate = self.validate(id_or_run)
            self.claim(candidate, owner=owner, automatic=automatic)
            faults.fire("resume_after_claim")
            record = self.verify_checkpoint(candidate, owner=owner)
        except OrchestratorUnavailable:
            raise
        except ResumableError as error:
            self.refused(id_or_run, error, owner=owner)
            raise
        try:
            return self.schedule(candidate, record, owner=owner)
        except OrchestratorUnavailable:
            # Nothing was scheduled: give the claim back rather than leave it to expire.
            with self.sessions.begin() as session:
                operations.release_claim(
                    session=session, operation_id=candidate.operation_id, owner=owner
                )
            raise
