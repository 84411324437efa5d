"""The `RunGateway` over a Prefect server, through Prefect's own client (no server in-process).

Every call that cannot reach the server raises `OrchestratorUnavailable`, so the API can
answer 503 and the CLI exit with code 5, with nothing claimed.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import httpx

from resumable.events import operation_resource
from resumable.resuming import OrchestratorUnavailable

logger = logging.getLogger(__name__)


def _unavailable(err: Exception) -> OrchestratorUnavailable:
    return OrchestratorUnavailable(
        f"the Prefect server cannot be reached ({type(err).__name__}: {err}); "
        "check PREFECT_API_URL and that `prefect server start` (or `make up`) is running"
    )


def _require_api_url() -> None:
    """Refuse to start Prefect's ephemeral in-process server, which would know none of our runs."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise OrchestratorUnavailable(
            "PREFECT_API_URL is not set; point it at the Prefect server that runs the training "
            "(for the local stack: `export PREFECT_API_URL=http://127.0.0.1:4200/api`)"
        )


class PrefectGateway:
    def flow_run_state(self, flow_run_id: str) -> str | None:
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        _require_api_url()
        try:
            run_id = uuid.UUID(flow_run_id)
        except ValueError:
            return None
        try:
            with get_client(sync_client=True) as client:
                flow_run = client.read_flow_run(run_id)
        except ObjectNotFound:
            return None
        except (httpx.HTTPError, OSError, RuntimeError) as err:
            raise _unavailable(err) from err
        return flow_run.state.type.value if flow_run.state else None

    def schedule_training(
        self,
        *,
        deployment: str,
        parameters: dict[str, Any],
        idempotency_key: str,
        tags: list[str],
    ) -> str:
        from prefect.deployments import run_deployment

        _require_api_url()
        try:
            flow_run = run_deployment(
                deployment,
                parameters=parameters,
                idempotency_key=idempotency_key,
                tags=tags,
                timeout=0,
                as_subflow=False,
            )
        except (httpx.HTTPError, OSError) as err:
            raise _unavailable(err) from err
        return str(flow_run.id)  # type: ignore[union-attr]  # sync context: a FlowRun, not a coroutine

    def cancel(self, flow_run_id: str) -> str:
        return cancel_flow_run(flow_run_id)

    def emit(
        self,
        event: str,
        operation_id: str,
        payload: dict[str, Any],
        flow_run_id: str | None = None,
    ) -> None:
        emit_operation_event(event, operation_id, payload, flow_run_id=flow_run_id)


def emit_operation_event(
    event: str,
    operation_id: str,
    payload: dict[str, Any],
    *,
    flow_run_id: str | None = None,
    deployment_id: str | None = None,
) -> None:
    """Emit a Prefect event about an operation; a failure to emit is logged, never raised."""
    from prefect.events import emit_event

    related = []
    if flow_run_id:
        related.append(
            {
                "prefect.resource.id": f"prefect.flow-run.{flow_run_id}",
                "prefect.resource.role": "flow-run",
            }
        )
    if deployment_id:
        related.append(
            {
                "prefect.resource.id": f"prefect.deployment.{deployment_id}",
                "prefect.resource.role": "deployment",
            }
        )
    try:
        emit_event(
            event=event,
            resource=operation_resource(operation_id),
            related=related,
            payload=payload,
        )
    except (
        Exception
    ) as err:  # events are for people and automations; never fail the work for them
        logger.warning("operation %s: could not emit %s: %s", operation_id, event, err)


def cancel_flow_run(flow_run_id: str) -> str:
    """Ask Prefect to cancel a flow run (its worker then signals it); returns the new state type."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    _require_api_url()
    try:
        with get_client(sync_client=True) as client:
            result: Any = client.set_flow_run_state(
                uuid.UUID(flow_run_id),
                Cancelling(message="cancelled through resumable"),
            )
    except (httpx.HTTPError, OSError) as err:
        raise _unavailable(err) from err
    return result.state.type.value if result.state else "CANCELLING"
