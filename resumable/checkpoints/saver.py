"""Saving from a training loop: a short blocking snapshot, then writing in the background.

Only `HostSnapshot.copy` blocks training: it copies every tensor into host buffers that
are reused from one save to the next (fresh allocations would cost several times more).
Writing, hashing and committing run on one background thread, one save in flight at a
time, since the next snapshot reuses the buffers the previous save is writing from.
"""

from __future__ import annotations

import copy
import logging
import queue
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from resumable.checkpoints.store import CheckpointRecord, CheckpointStore
from resumable.errors import CheckpointSaveFailed
from resumable.spec import CheckpointPolicy
from resumable.state import TrainingState
from resumable.training import Trainer

logger = logging.getLogger(__name__)


class HostSnapshot:
    """Host buffers that receive a copy of the training state, reused across saves."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def reserve(self, layout: dict[str, tuple[torch.Size, torch.dtype, bool]]) -> None:
        """Allocate and touch the buffers for a state of this layout, so a later `copy` only copies."""
        for key, (shape, dtype, pinned) in layout.items():
            buffer = self._buffers.get(key)
            if buffer is None or buffer.shape != shape or buffer.dtype != dtype:
                buffer = torch.empty(shape, dtype=dtype, pin_memory=pinned)
                buffer.zero_()  # fault the pages in now rather than inside the blocking copy
                self._buffers[key] = buffer

    def copy(self, state: TrainingState) -> TrainingState:
        copied: dict[str, torch.Tensor] = {}
        on_cuda = False
        for key, tensor in state.tensors.items():
            buffer = self._buffers.get(key)
            if (
                buffer is None
                or buffer.shape != tensor.shape
                or buffer.dtype != tensor.dtype
            ):
                buffer = torch.empty(
                    tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda
                )
                self._buffers[key] = buffer
            buffer.copy_(tensor.detach(), non_blocking=tensor.is_cuda)
            on_cuda = on_cuda or tensor.is_cuda
            copied[key] = buffer
        if on_cuda:
            torch.cuda.synchronize()
        for stale in set(self._buffers) - set(copied):
            del self._buffers[stale]
        return TrainingState(tensors=copied, meta=copy.deepcopy(state.meta))


class PeriodicSchedule:
    """Decides when a periodic checkpoint is due; intervals count from the start of the run."""

    def __init__(
        self, policy: CheckpointPolicy, *, started_at: float | None = None
    ) -> None:
        self.policy = policy
        self.last_save = started_at if started_at is not None else time.monotonic()

    def due(self, trainer: Trainer, *, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        every_epochs = self.policy.every_epochs
        if (
            every_epochs
            and trainer.batch == 0
            and trainer.epoch > 0
            and trainer.epoch % every_epochs == 0
        ):
            return True
        every_seconds = self.policy.every_seconds
        return every_seconds is not None and now - self.last_save >= every_seconds

    def saved(self, *, now: float | None = None) -> None:
        self.last_save = time.monotonic() if now is None else now


class CheckpointSaver:
    """Saves one operation's checkpoints from its training loop.

    `save_async` returns after the snapshot; `save_blocking` returns once committed. A
    failed background save is logged and the previous checkpoint stays the latest; the
    error is kept in `failed_saves` so callers can stop if their policy says so.
    """

    def __init__(
        self,
        store: CheckpointStore,
        *,
        operation_id: str,
        flow_run_id: str | None,
        policy: CheckpointPolicy,
    ) -> None:
        self.store = store
        self.operation_id = operation_id
        self.flow_run_id = flow_run_id
        self.policy = policy
        self.snapshot = HostSnapshot()
        self.last_record: CheckpointRecord | None = None
        self.failed_saves: list[BaseException] = []
        self._committed: queue.SimpleQueue[CheckpointRecord] = queue.SimpleQueue()
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="checkpoint-save"
        )
        self._pending: Future[CheckpointRecord | None] | None = None

    def prepare(self, trainer: Trainer) -> None:
        """Reserve the host buffers in the background, so the first save blocks no longer than later ones.

        Call it once the state has its final layout (after the first step, when the optimizer has state).
        """
        layout = {
            key: (t.shape, t.dtype, t.is_cuda)
            for key, t in trainer.capture_state().tensors.items()
        }
        self._pending = self._executor.submit(self._reserve, layout)

    def _reserve(self, layout: dict[str, tuple[torch.Size, torch.dtype, bool]]) -> None:
        self.snapshot.reserve(layout)
        return None

    def save_async(
        self, trainer: Trainer, kind: str = "periodic"
    ) -> Future[CheckpointRecord | None]:
        self.wait()
        state = self.snapshot.copy(trainer.capture_state())
        self._pending = self._executor.submit(
            self._save, state, kind, trainer.latest_metrics()
        )
        return self._pending

    def save_blocking(
        self, trainer: Trainer, kind: str, *, after_failure: bool = False
    ) -> CheckpointRecord:
        self.wait()
        state = self.snapshot.copy(trainer.capture_state(after_failure=after_failure))
        return self._save(state, kind, trainer.latest_metrics())

    def _save(
        self, state: TrainingState, kind: str, metrics: dict[str, float]
    ) -> CheckpointRecord:
        record = self.store.save(
            state,
            operation_id=self.operation_id,
            flow_run_id=self.flow_run_id,
            kind=kind,
            metrics=metrics,
            policy=self.policy,
        )
        self.last_record = record
        self._committed.put(record)
        return record

    def check_failures(self) -> None:
        """Raise `CheckpointSaveFailed` if a background save failed and the policy says `stop`."""
        if self._pending is not None and self._pending.done():
            self.wait()
        if self.failed_saves and self.policy.on_save_error == "stop":
            error = self.failed_saves[-1]
            raise CheckpointSaveFailed(
                f"operation {self.operation_id}: a checkpoint save failed ({error}); the policy says to stop. "
                "The previous checkpoint is intact: free space or fix the store, then resume"
            ) from error

    def drain_committed(self) -> list[CheckpointRecord]:
        """The checkpoints committed since the last call, for the training loop to report."""
        records = []
        while not self._committed.empty():
            records.append(self._committed.get_nowait())
        return records

    def wait(self) -> CheckpointRecord | None:
        """Wait for the save in flight, if any; a failure is logged, kept and not raised."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        try:
            return pending.result()
        except Exception as err:
            self.failed_saves.append(err)
            logger.error(
                "operation %s: a background checkpoint save failed, the previous checkpoint stays the latest: %s",
                self.operation_id,
                err,
            )
            return None

    def close(self) -> None:
        self.wait()
        self._executor.shutdown(wait=True)
