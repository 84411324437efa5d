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
