"""Names and resources of the events the project emits, for automations and notifications.

Every event's resource is the operation (`resumable.operation.<id>`); the flow run and the
deployment it concerns, where there is one, are related resources. The exception is the
training heartbeat, whose resource is the flow run itself, like Prefect's own flow-run
events, so that one automation can wait for either (see `deployments.automations`).
"""

from __future__ import annotations

CHECKPOINT_COMMITTED = "resumable.checkpoint.committed"
CHECKPOINT_CORRUPTED = "resumable.checkpoint.corrupted"
OPERATION_RESUMED = "resumable.operation.resumed"
RESUME_REFUSED = "resumable.resume.refused"
TRAINING_HEARTBEAT = "resumable.training.heartbeat"


def operation_resource(operation_id: str) -> dict[str, str]:
    return {
        "prefect.resource.id": f"resumable.operation.{operation_id}",
        "prefect.resource.name": operation_id,
    }
