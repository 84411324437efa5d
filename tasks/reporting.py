"""What a training run shows in the Prefect UI: progress, metrics, checkpoints, the loss curve, events.

Artifacts are keyed by operation (`progress-<id>`, `metrics-<id>`, `checkpoints-<id>`,
`loss-<id>`), so every attempt adds a version to the same story. Their contents come from
the training state, which a resumed attempt restores, so they continue across attempts.
Publishing never stops training: a failure is logged and the run goes on.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.runtime import deployment

from resumable import events, runtime
from resumable.charts import loss_markdown
from resumable.checkpoints.store import CheckpointRecord
from resumable.prefect_gateway import emit_operation_event
from resumable.training import Trainer

logger = logging.getLogger(__name__)

PROGRESS_EVERY_SECONDS = 2.0
TABLES_EVERY_SECONDS = 10.0


def artifact_key(kind: str, operation_id: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return f"{kind}-{re.sub(r'[^a-z0-9-]', '-', operation_id.lower())}"[:100]


def _quietly(action: Callable[[], Any], what: str, operation_id: str) -> Any:
    try:
        return action()
    except Exception as err:
        logger.warning(
            "operation %s: could not publish %s: %s", operation_id, what, err
        )
        return None


class RunReporter:
    def __init__(self, operation_id: str, flow_run_id: str, label: str) -> None:
        self.operation_id = operation_id
        self.flow_run_id = flow_run_id
        self.label = label
        self._progress_id: Any = None
        self._last_progress = 0.0
        self._last_tables = -TABLES_EVERY_SECONDS
        self._last_checkpoint_table = -TABLES_EVERY_SECONDS

    def progress(self, trainer: Trainer, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_progress < PROGRESS_EVERY_SECONDS:
            return
        self._last_progress = now
        share = round(100.0 * trainer.batches_done / max(1, trainer.total_batches), 2)
        if self._progress_id is None:
            self._progress_id = _quietly(
                lambda: create_progress_artifact(
                    progress=share,
                    key=artifact_key("progress", self.operation_id),
                    description=f"Share of the operation's {trainer.total_batches} batches done, across attempts",
                ),
                "progress",
                self.operation_id,
            )
        else:
            _quietly(
                lambda: update_progress_artifact(self._progress_id, share),
                "progress",
                self.operation_id,
            )

    def epoch_done(self, trainer: Trainer, *, force: bool = False) -> None:
        """Publish progress, the metrics table and the loss curve.

        Tables are rewritten at most every `TABLES_EVERY_SECONDS` (each write is a new
        artifact version and costs the server work that short epochs would multiply),
        and always when forced: at every checkpoint that ends an attempt.
        """
        self.progress(trainer, force=True)
        now = time.monotonic()
        if not force and now - self._last_tables < TABLES_EVERY_SECONDS:
            return
        self._last_tables = now
        rows = [
            {
                k: (round(v, 6) if isinstance(v, float) else v)
                for k, v in {**record, "epoch": record["epoch"] + 1}.items()
            }
            for record in trainer.history
        ]
        _quietly(
            lambda: create_table_artifact(
                table=rows,
                key=artifact_key("metrics", self.operation_id),
                description="Per-epoch metrics, every attempt",
            ),
            "metrics",
            self.operation_id,
        )
        _quietly(
            lambda: create_markdown_artifact(
                markdown=loss_markdown(trainer.history, self.operation_id),
                key=artifact_key("loss", self.operation_id),
                description="Loss curve across every attempt",
            ),
            "loss curve",
            self.operation_id,
        )

    def checkpoints_committed(
        self, records: list[CheckpointRecord], *, force: bool = False
    ) -> None:
        """Emit an event per committed checkpoint; rewrite the checkpoint table (rate-limited like the others)."""
        if not records and not force:
            return
        for record in records:
            emit_operation_event(
                events.CHECKPOINT_COMMITTED,
                self.operation_id,
                {
                    "checkpoint_id": record.id,
                    "kind": record.kind,
                    "epoch": record.epoch,
                    "batch": record.batch,
                    "size_bytes": record.size_bytes,
                },
                flow_run_id=self.flow_run_id,
                deployment_id=deployment.id,
            )
        now = time.monotonic()
        if not force and now - self._last_checkpoint_table < TABLES_EVERY_SECONDS:
            return
        self._last_checkpoint_table = now
        table = [
            {
                "id": r.id,
                "kind": r.kind,
                "epoch": r.epoch,
                "batch": r.batch,
                "size_mb": round(r.size_bytes / 1e6, 2),
                "status": r.status,
                "flow_run": r.flow_run_id,
            }
            for r in runtime.checkpoint_store().list_checkpoints(
                self.operation_id, include_all=True
            )
            if r.status != "staging"
        ]
        _quietly(
            lambda: create_table_artifact(
                table=table,
                key=artifact_key("checkpoints", self.operation_id),
                description="Checkpoints of the operation",
            ),
            "checkpoint table",
            self.operation_id,
        )

    def corrupted(self, skipped: list[tuple[str, str]]) -> None:
        for checkpoint_id, reason in skipped:
            emit_operation_event(
                events.CHECKPOINT_CORRUPTED,
                self.operation_id,
                {"checkpoint_id": checkpoint_id, "reason": reason},
                flow_run_id=self.flow_run_id,
                deployment_id=deployment.id,
            )
