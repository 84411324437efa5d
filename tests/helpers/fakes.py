"""A stand-in for Prefect where a test is about the decision, not the orchestrator."""

from __future__ import annotations

import uuid
from typing import Any

from resumable.resuming import OrchestratorUnavailable


class FakeGateway:
    def __init__(self) -> None:
        self.states: dict[str, str] = {}
        self.scheduled: dict[str, str] = {}
        self.reachable = True
        self.cancelled: list[str] = []
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def flow_run_state(self, flow_run_id: str) -> str | None:
        if not self.reachable:
            raise OrchestratorUnavailable("the Prefect server cannot be reached (fake)")
        return self.states.get(flow_run_id)

    def schedule_training(
        self,
        *,
        deployment: str,
        parameters: dict[str, Any],
        idempotency_key: str,
        tags: list[str],
    ) -> str:
        run = self.scheduled.setdefault(idempotency_key, f"run-{uuid.uuid4().hex[:12]}")
        self.states[run] = "SCHEDULED"
        return run

    def cancel(self, flow_run_id: str) -> str:
        self.cancelled.append(flow_run_id)
        self.states[flow_run_id] = "CANCELLING"
        return "CANCELLING"

    def emit(
        self,
        event: str,
        operation_id: str,
        payload: dict[str, Any],
        flow_run_id: str | None = None,
    ) -> None:
        self.events.append((event, operation_id, payload))


def seed_operation(
    sessions: Any,
    store: Any,
    gateway: FakeGateway,
    operation_id: str,
    *,
    state: str = "CANCELLED",
    batches: int | None = 3,
    spec: Any = None,
) -> None:
    """An operation whose latest attempt is in `state`, with a cancellation checkpoint after
    `batches` batches (none when `batches` is None)."""
    from resumable import operations
    from resumable.checkpoints.saver import CheckpointSaver
    from resumable.spec import TrainingSpec
    from resumable.training import Trainer

    spec = spec or TrainingSpec(recipe="tiny", epochs=2, batch_size=16)
    with sessions.begin() as session:
        operations.create_operation(
            session=session, operation_id=operation_id, spec=spec
        )
    gateway.states[operation_id] = state
    if batches is not None:
        trainer = Trainer(spec)
        trainer.train(max_batches=batches)
        saver = CheckpointSaver(
            store,
            operation_id=operation_id,
            flow_run_id=operation_id,
            policy=spec.checkpoint,
        )
        saver.save_blocking(trainer, "cancellation")
