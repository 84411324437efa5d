"""The `RunGateway` over a Prefect server, through Prefect's own client (no server in-process).

Every call that cannot reach the server raises `OrchestratorUnavailable`, so the API can
answer 503 and the CLI exit with code 5, with nothing claimed.
"""

from __future__ import annotations

import logging
import ssl
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import httpx

from resumable.events import operation_resource
from resumable.resuming import OrchestratorUnavailable

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient

logger = logging.getLogger(__name__)

# A Prefect server on SQLite answers 503 ("database is locked") when a write races one of
# its own background writers, and Prefect's client then sleeps 2 s, 4 s, 8 s... before the
# next try (2 s even when told to make no retries). The writes that decide a resume are
# tried again sooner; past these delays, Prefect's own backoff takes over.
BUSY_RETRY_DELAYS = (0.05, 0.1, 0.2, 0.4, 0.8)


class BusyRetryTransport(httpx.HTTPTransport):
    """An HTTP transport that sends a request again, soon, while the server answers 503."""

    def __init__(
        self,
        delays: tuple[float, ...] = BUSY_RETRY_DELAYS,
        verify: ssl.SSLContext | bool = True,
        http2: bool = False,
    ) -> None:
        # Connection retries as Prefect's client sets them on its own transport.
        super().__init__(retries=3, verify=verify, http2=http2)
        self.delays = delays

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for delay in self.delays:
            response = super().handle_request(request)
            if response.status_code != 503:
                return response
            response.read()
            response.close()
            time.sleep(delay)
        return super().handle_request(request)


@contextmanager
def busy_tolerant_client() -> Iterator[SyncPrefectClient]:
    """A Prefect client for writes that may be repeated (idempotent ones), over `BusyRetryTransport`.

    It verifies TLS as Prefect's own client does (`PREFECT_API_SSL_CERT_FILE`,
    `PREFECT_API_TLS_INSECURE_SKIP_VERIFY`).

    Note:
        A transport of our own bypasses httpx's proxy settings (`HTTPS_PROXY`); a Prefect
        server reached only through a proxy cannot be used to resume.
    """
    import certifi
    from prefect.client.orchestration import get_client
    from prefect.settings import (
        PREFECT_API_ENABLE_HTTP2,
        PREFECT_API_SSL_CERT_FILE,
        PREFECT_API_TLS_INSECURE_SKIP_VERIFY,
    )

    if PREFECT_API_TLS_INSECURE_SKIP_VERIFY.value():
        verify = ssl.create_default_context()
        verify.check_hostname = False
        verify.verify_mode = ssl.CERT_NONE
    else:
        verify = ssl.create_default_context(
            cafile=PREFECT_API_SSL_CERT_FILE.value() or certifi.where()
        )
    transport = BusyRetryTransport(
        verify=verify, http2=bool(PREFECT_API_ENABLE_HTTP2.value())
    )
    with get_client(
        httpx_settings={"transport": transport}, sync_client=True
    ) as client:
        yield client


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
        _require_api_url()
        try:
            # The idempotency key makes a repeated request return the run the first one made.
            with busy_tolerant_client() as client:
                flow_run = client.create_flow_run_from_deployment(
                    client.read_deployment_by_name(deployment).id,
                    parameters=parameters,
                    idempotency_key=idempotency_key,
                    tags=tags,
                )
        except (httpx.HTTPError, OSError) as err:
            raise _unavailable(err) from err
        return str(flow_run.id)

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
    from prefect.states import Cancelling

    _require_api_url()
    try:
        with busy_tolerant_client() as client:
            result: Any = client.set_flow_run_state(
                uuid.UUID(flow_run_id),
                Cancelling(message="cancelled through resumable"),
            )
    except (httpx.HTTPError, OSError) as err:
        raise _unavailable(err) from err
    return result.state.type.value if result.state else "CANCELLING"
