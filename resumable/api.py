"""The operations HTTP API (FastAPI), started with `resumable api`; OpenAPI docs at `/docs`.

Answers like the system it grows from: `POST /operations/{id}/resume` gives 200 with the
scheduled run and where it resumed from, 404 for an unknown operation or one without a
checkpoint, 409 when the operation is not resumable or another request already resumed it
(the body names the state or the winning run), 422 for a malformed id, and 503 when the
Prefect server cannot be reached, with nothing claimed. With `RESUMABLE_API_TOKEN` set,
every request needs `Authorization: Bearer <token>`, else 401.
"""

from __future__ import annotations

import logging
import secrets
import uuid
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from resumable.errors import (
    CheckpointNotFound,
    InvalidSpec,
    NotCancellable,
    NotResumable,
    OperationNotFound,
    ResumableError,
    ResumeConflict,
)
from resumable.resuming import OrchestratorUnavailable, ResumeResult
from resumable.service import (
    CancelResult,
    CheckpointView,
    OperationDetail,
    OperationsService,
    OperationView,
)
from resumable.settings import Settings

logger = logging.getLogger(__name__)

OperationId = Annotated[
    str,
    Path(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="An operation id, or the flow run id of any of its attempts",
    ),
]


class Envelope(BaseModel):
    success: bool = True


class ResumeEnvelope(Envelope):
    data: ResumeResult


class OperationEnvelope(Envelope):
    data: OperationDetail


class OperationsEnvelope(Envelope):
    data: list[OperationView]


class CheckpointsEnvelope(Envelope):
    data: list[CheckpointView]


class CancelEnvelope(Envelope):
    data: CancelResult


class ErrorBody(BaseModel):
    success: bool = False
    error: str
    detail: str
    state: str | None = None
    winner: str | None = None
    flow_run_id: str | None = None


def _error(status: int, kind: str, err: Exception, **extra: Any) -> JSONResponse:
    body = ErrorBody(error=kind, detail=str(err), **extra)
    return JSONResponse(status_code=status, content=body.model_dump(exclude_none=True))


def create_app(service: OperationsService, settings: Settings) -> FastAPI:
    app = FastAPI(
        title="resumable operations API",
        version="1",
        description="Training operations that survive interruption: list, inspect, cancel and resume them.",
        responses={
            401: {"model": ErrorBody},
            422: {"model": ErrorBody},
            503: {"model": ErrorBody},
        },
    )
    token = settings.api_token.get_secret_value() if settings.api_token else None

    def require_token(authorization: Annotated[str | None, Header()] = None) -> None:
        if token is None:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            given.encode(), token.encode()
        ):
            raise _Unauthorized()

    @app.exception_handler(_Unauthorized)
    def _unauthorized(request: Request, err: _Unauthorized) -> JSONResponse:
        response = _error(
            401,
            "unauthorized",
            Exception("a valid bearer token is required (RESUMABLE_API_TOKEN)"),
        )
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    @app.exception_handler(OperationNotFound)
    def _not_found(request: Request, err: OperationNotFound) -> JSONResponse:
        return _error(404, "operation_not_found", err)

    @app.exception_handler(CheckpointNotFound)
    def _no_checkpoint(request: Request, err: CheckpointNotFound) -> JSONResponse:
        return _error(404, "checkpoint_not_found", err)

    @app.exception_handler(ResumeConflict)
    def _conflict(request: Request, err: ResumeConflict) -> JSONResponse:
        return _error(
            409,
            "already_resumed",
            err,
            state=err.state,
            winner=err.winner,
            flow_run_id=err.continuation,
        )

    @app.exception_handler(NotResumable)
    def _not_resumable(request: Request, err: NotResumable) -> JSONResponse:
        return _error(409, "not_resumable", err, state=err.state)

    @app.exception_handler(NotCancellable)
    def _not_cancellable(request: Request, err: NotCancellable) -> JSONResponse:
        return _error(409, "not_cancellable", err)

    @app.exception_handler(InvalidSpec)
    def _invalid(request: Request, err: InvalidSpec) -> JSONResponse:
        return _error(422, "invalid", err)

    @app.exception_handler(RequestValidationError)
    def _malformed(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
        )
        return _error(422, "invalid", Exception(problems))

    @app.exception_handler(OrchestratorUnavailable)
    def _unavailable(request: Request, err: OrchestratorUnavailable) -> JSONResponse:
        return _error(503, "prefect_unreachable", err)

    @app.exception_handler(ResumableError)
    def _other(request: Request, err: ResumableError) -> JSONResponse:
        return _error(409, type(err).__name__, err)

    guarded = [Depends(require_token)]

    @app.get("/operations", response_model=OperationsEnvelope, dependencies=guarded)
    def list_operations(
        status: Annotated[
            str | None, Query(pattern=r"^[A-Za-z]{1,20}$", description="e.g. CANCELLED")
        ] = None,
        resumable: bool | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 200,
    ) -> OperationsEnvelope:
        return OperationsEnvelope(
            data=service.list_operations(
                status=status, resumable=resumable, limit=limit
            )
        )

    @app.get(
        "/operations/{operation_id}",
        response_model=OperationEnvelope,
        responses={404: {"model": ErrorBody}},
        dependencies=guarded,
    )
    def get_operation(operation_id: OperationId) -> OperationEnvelope:
        return OperationEnvelope(data=service.get(operation_id))

    @app.get(
        "/operations/{operation_id}/checkpoints",
        response_model=CheckpointsEnvelope,
        responses={404: {"model": ErrorBody}},
        dependencies=guarded,
    )
    def list_checkpoints(
        operation_id: OperationId, include_all: bool = False
    ) -> CheckpointsEnvelope:
        return CheckpointsEnvelope(
            data=service.checkpoints(operation_id, include_all=include_all)
        )

    @app.post(
        "/operations/{operation_id}/cancel",
        response_model=CancelEnvelope,
        responses={404: {"model": ErrorBody}, 409: {"model": ErrorBody}},
        dependencies=guarded,
    )
    def cancel_operation(operation_id: OperationId) -> CancelEnvelope:
        return CancelEnvelope(data=service.cancel(operation_id))

    @app.post(
        "/operations/{operation_id}/resume",
        response_model=ResumeEnvelope,
        responses={404: {"model": ErrorBody}, 409: {"model": ErrorBody}},
        dependencies=guarded,
    )
    def resume_operation(operation_id: OperationId) -> ResumeEnvelope:
        return ResumeEnvelope(
            data=service.resume(operation_id, owner=f"api:{uuid.uuid4().hex}")
        )

    @app.get("/health", include_in_schema=False)
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


class _Unauthorized(Exception):
    pass


def build_service(settings: Settings) -> OperationsService:
    from resumable import runtime
    from resumable.prefect_gateway import PrefectGateway

    return OperationsService(
        runtime.sessions(settings),
        runtime.checkpoint_store(settings),
        PrefectGateway(),
        settings,
    )


def app_from_settings() -> FastAPI:
    """The app for `uvicorn resumable.api:app_from_settings --factory`."""
    from resumable.settings import get_settings

    settings = get_settings()
    return create_app(build_service(settings), settings)
