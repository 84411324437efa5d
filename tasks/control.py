"""How a training run learns it must stop: a SIGTERM from its worker, or its own state in Prefect.

A worker cancels a run by sending SIGTERM to its process; a run started without a worker
is never signalled, and a paused run is not signalled either. `StopRequests` watches both
ways: while installed, SIGTERM only raises a flag (Prefect's own handler would raise an
exception wherever the main thread happens to be, even half-way through an optimizer
step), and a thread polls the run's state. The training loop asks `requested` at every
batch boundary, which costs one `Event.is_set()`.

The same thread emits a `resumable.training.heartbeat` event every `heartbeat_seconds`, so
that an automation can mark a run CRASHED when its machine is lost with its worker
(`deployments.automations.enable_lost_run_detection`). A run that sees itself CRASHED while
alive has been declared lost: it stops without writing another checkpoint (`lost`).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import uuid
from types import FrameType, TracebackType
from typing import Any

from resumable.events import TRAINING_HEARTBEAT

logger = logging.getLogger(__name__)

STOP_STATES = {
    "CANCELLING": "cancel",
    "CANCELLED": "cancel",
    "PAUSED": "pause",
    "CRASHED": "lost",
}


class StopRequests:
    def __init__(
        self,
        flow_run_id: str | None,
        *,
        poll_seconds: float = 1.0,
        heartbeat_seconds: float | None = None,
        heartbeat_related: list[dict[str, str]] | None = None,
        run_logger: logging.Logger
        | logging.LoggerAdapter[logging.Logger]
        | None = None,
    ) -> None:
        self.flow_run_id = flow_run_id
        self.poll_seconds = poll_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.heartbeat_related = heartbeat_related or []
        self.run_logger = run_logger or logger
        self.reason: str | None = None
        self.signalled = False
        self._event = threading.Event()
        self._closed = threading.Event()
        self._previous_handler: Any = None
        self._thread: threading.Thread | None = None

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    @property
    def lost(self) -> bool:
        """The server has declared this run CRASHED: write nothing more."""
        return self.reason == "lost"

    def request(self, reason: str) -> None:
        if self.reason is None or reason == "lost":
            self.reason = reason
        self._event.set()

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.signalled = True
        self.request("signal")

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        else:
            logger.warning(
                "not on the main thread: SIGTERM cannot be caught, cancellation is seen by polling only"
            )
        if self.flow_run_id:
            self._thread = threading.Thread(
                target=self._poll, name="stop-requests", daemon=True
            )
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closed.set()
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _poll(self) -> None:
        from prefect.client.orchestration import get_client

        assert self.flow_run_id is not None
        run_id = uuid.UUID(self.flow_run_id)
        failures = 0
        next_beat = time.monotonic()
        seen_stop_state = False
        with get_client(sync_client=True) as client:
            while not self._closed.wait(self.poll_seconds):
                if self.heartbeat_seconds and time.monotonic() >= next_beat:
                    self._beat()
                    next_beat = time.monotonic() + self.heartbeat_seconds
                if seen_stop_state:
                    continue  # only the heartbeat goes on while the run saves and ends
                try:
                    state = client.read_flow_run(run_id).state
                    failures = 0
                except (
                    Exception
                ) as err:  # the server may restart; keep training and keep asking
                    failures += 1
                    if failures in (1, 10, 100):
                        logger.warning(
                            "cannot read the state of flow run %s (%s); will keep trying",
                            self.flow_run_id,
                            err,
                        )
                    continue
                if state is not None and state.type.value in STOP_STATES:
                    self.request(STOP_STATES[state.type.value])
                    seen_stop_state = True
                    if self.lost:
                        self.run_logger.error(
                            "flow run %s is declared lost: the server marked it CRASHED (%s)"
                            " while it trains; it stops at the next batch boundary",
                            self.flow_run_id,
                            state.message,
                        )
                    else:
                        self.run_logger.info(
                            "flow run %s is %s: it stops at the next batch boundary and saves a checkpoint",
                            self.flow_run_id,
                            state.type.value,
                        )

    def _beat(self) -> None:
        from prefect.events import emit_event

        try:
            emit_event(
                TRAINING_HEARTBEAT,
                resource={
                    "prefect.resource.id": f"prefect.flow-run.{self.flow_run_id}"
                },
                related=self.heartbeat_related,
            )
        except (
            Exception
        ) as err:  # a missed beat is the detector's business, not training's
            logger.debug("heartbeat of flow run %s not sent: %s", self.flow_run_id, err)

    def current_state(self) -> str | None:
        """The run's state type as the server sees it now, or None when it cannot be read."""
        from prefect.client.orchestration import get_client

        if not self.flow_run_id:
            return None
        try:
            with get_client(sync_client=True) as client:
                state = client.read_flow_run(uuid.UUID(self.flow_run_id)).state
        except Exception:
            return None
        return state.type.value if state else None
