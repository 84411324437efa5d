"""The checkpoint store: files through fsspec, metadata in SQL, and a commit protocol between them.

A save goes through three steps, and only the last makes it visible:

1. `begin`: a row in status `staging` is committed, so that no file ever exists without a row.
2. The files are written and hashed, and `manifest.json`, listing each file's size and
   SHA-256, is written last.
3. `commit`: the row becomes `committed`, with the manifest's own hash.

Loading verifies every hash against the manifest and the manifest against the row. A
checkpoint that fails is marked `corrupted` (with the reason) and the next older good one
is tried. Retention runs only after a commit, and never removes the newest good checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from resumable import faults
from resumable.checkpoints.tensorfile import (
    HASH_ALGORITHM,
    map_tensor_file,
    read_tensor_file,
    write_tensor_file,
)
from resumable.errors import (
    CheckpointCorrupted,
    CheckpointLocationInvalid,
    CheckpointNotFound,
)
from resumable.models import Checkpoint, utcnow
from resumable.spec import CheckpointPolicy
from resumable.state import MODEL_PREFIX, TrainingState

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
TRAINING_FILE = "training.safetensors"
STATE_FILE = "state.json"
MANIFEST_FORMAT = "resumable-checkpoint/1"
KINDS = ("periodic", "cancellation", "failure", "final")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class CheckpointRecord:
    id: str
    operation_id: str
    flow_run_id: str | None
    kind: str
    epoch: int
    batch: int
    step: int
    created_at: datetime
    committed_at: datetime | None
    size_bytes: int
    metrics: dict[str, Any]
    status: str
    status_reason: str | None

    @classmethod
    def from_row(cls, row: Checkpoint) -> CheckpointRecord:
        return cls(
            id=row.id,
            operation_id=row.operation_id,
            flow_run_id=row.flow_run_id,
            kind=row.kind,
            epoch=row.epoch,
            batch=row.batch,
            step=row.step,
            created_at=row.created_at,
            committed_at=row.committed_at,
            size_bytes=row.size_bytes,
            metrics=dict(row.metrics or {}),
            status=row.status,
            status_reason=row.status_reason,
        )


@dataclass
class LoadedCheckpoint:
    record: CheckpointRecord
    state: TrainingState
    skipped: list[tuple[str, str]] = field(default_factory=list)


def check_safe_id(value: str, what: str) -> str:
    """Refuse ids that could name a path outside the store's root (`..`, `/`, schemes)."""
    if not isinstance(value, str) or not _SAFE_ID.match(value) or ".." in value:
        raise CheckpointLocationInvalid(
            f"{what} {value!r} cannot name a checkpoint location: use letters, digits, '_', '-' and '.' "
            "(no '..', no '/', no scheme), at most 128 characters"
        )
    return value


class CheckpointStore:
    """Checkpoints of every operation under one fsspec root, with their rows in one database."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        root_url: str,
        *,
        stale_after_seconds: float = 3600.0,
    ) -> None:
        self.sessions = sessions
        self.root_url = root_url
        self.fs, root = fsspec.core.url_to_fs(root_url)
        self.root = root.rstrip("/")
        self.stale_after = timedelta(seconds=stale_after_seconds)
        self._local = isinstance(self.fs, LocalFileSystem)

    def checkpoint_dir(self, operation_id: str, checkpoint_id: str) -> str:
        return "/".join(
            (
                self.root,
                check_safe_id(operation_id, "operation id"),
                check_safe_id(checkpoint_id, "checkpoint id"),
            )
        )

    # -- saving ---------------------------------------------------------------------

    def save(
        self,
        state: TrainingState,
        *,
        operation_id: str,
        flow_run_id: str | None,
        kind: str,
        metrics: dict[str, Any] | None = None,
        policy: CheckpointPolicy | None = None,
    ) -> CheckpointRecord:
        """Write, verify-hash and commit `state` (CPU tensors that stay unchanged meanwhile), then prune."""
        checkpoint_id = self.begin(
            operation_id=operation_id,
            flow_run_id=flow_run_id,
            kind=kind,
            state=state,
            metrics=metrics,
        )
        try:
            manifest_sha, size = self.write_files(operation_id, checkpoint_id, state)
            faults.fire("save_commit")
            record = self.commit(checkpoint_id, manifest_sha, size)
        except Exception as err:
            self._abandon(operation_id, checkpoint_id, f"save failed: {err!r}")
            raise
        logger.info(
            "operation %s: committed %s checkpoint %s at epoch %d batch %d (%d bytes)",
            operation_id,
            kind,
            checkpoint_id,
            record.epoch,
            record.batch,
            size,
        )
        if policy is not None:
            self.prune(operation_id, policy)
        return record

    def begin(
        self,
        *,
        operation_id: str,
        flow_run_id: str | None,
        kind: str,
        state: TrainingState,
        metrics: dict[str, Any] | None = None,
    ) -> str:
        if kind not in KINDS:
            raise ValueError(f"checkpoint kind must be one of {KINDS}, not {kind!r}")
        check_safe_id(operation_id, "operation id")
        position = state.meta["position"]
        checkpoint_id = uuid.uuid4().hex
        with self.sessions.begin() as session:
            session.add(
                Checkpoint(
                    id=checkpoint_id,
                    operation_id=operation_id,
                    flow_run_id=flow_run_id,
                    kind=kind,
                    epoch=position["epoch"],
                    batch=position["batch"],
                    step=position["step"],
                    metrics=dict(metrics or {}),
                    status="staging",
                    fingerprint=state.meta["fingerprint"],
                )
            )
        return checkpoint_id

    def write_files(
        self, operation_id: str, checkpoint_id: str, state: TrainingState
    ) -> tuple[str, int]:
        """Write the tensor files and state, then the manifest last; returns (manifest SHA-256, total size)."""
        directory = self.checkpoint_dir(operation_id, checkpoint_id)
        self.fs.makedirs(directory, exist_ok=True)
        model = {
            k[len(MODEL_PREFIX) :]: v
            for k, v in state.tensors.items()
            if k.startswith(MODEL_PREFIX)
        }
        training = {
            k: v for k, v in state.tensors.items() if not k.startswith(MODEL_PREFIX)
        }

        files: dict[str, dict[str, Any]] = {}
        for name, tensors in ((MODEL_FILE, model), (TRAINING_FILE, training)):
            with self._open_durable(f"{directory}/{name}") as stream:
                size, digest = write_tensor_file(stream, tensors)
            files[name] = {"size": size, "sha256_chunks": digest}
            if name == MODEL_FILE:
                faults.fire("save_write")
        state_bytes = json.dumps(state.meta, separators=(",", ":")).encode()
        files[STATE_FILE] = self._write_bytes(f"{directory}/{STATE_FILE}", state_bytes)
        faults.fire("save_manifest")

        manifest = {
            "format": MANIFEST_FORMAT,
            "checkpoint_id": checkpoint_id,
            "operation_id": operation_id,
            "position": state.meta["position"],
            "fingerprint": state.meta["fingerprint"],
            "tensor_file_hash": HASH_ALGORITHM,
            "files": files,
        }
        manifest_bytes = json.dumps(manifest, indent=1, sort_keys=True).encode()
        manifest_entry = self._write_bytes(f"{directory}/{MANIFEST}", manifest_bytes)
        if self._local:
            _fsync_directory(directory)
        total = sum(entry["size"] for entry in files.values()) + manifest_entry["size"]
        return manifest_entry["sha256"], total

    def commit(
        self, checkpoint_id: str, manifest_sha: str, size: int
    ) -> CheckpointRecord:
        with self.sessions.begin() as session:
            result = session.execute(
                update(Checkpoint)
                .where(Checkpoint.id == checkpoint_id, Checkpoint.status == "staging")
                .values(
                    status="committed",
                    manifest_sha256=manifest_sha,
                    size_bytes=size,
                    committed_at=utcnow(),
                )
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                raise CheckpointCorrupted(
                    checkpoint_id,
                    "its staging row was removed before the commit (was it taken for a dead save?)",
                )
            row = session.get_one(Checkpoint, checkpoint_id)
            return CheckpointRecord.from_row(row)

    def _abandon(self, operation_id: str, checkpoint_id: str, reason: str) -> None:
        try:
            with self.sessions.begin() as session:
                session.execute(
                    update(Checkpoint)
                    .where(
                        Checkpoint.id == checkpoint_id, Checkpoint.status == "staging"
                    )
                    .values(status="abandoned", status_reason=reason[:2000])
                )
            self._remove_files(operation_id, checkpoint_id)
        except Exception:  # the save's own error is the one to report
            logger.exception(
                "operation %s: could not clean up failed save %s",
                operation_id,
                checkpoint_id,
            )

    @contextmanager
    def _open_durable(self, path: str) -> Iterator[IO[bytes]]:
        if self._local:
            with open(path, "wb") as stream:
                yield stream
                stream.flush()
                os.fsync(stream.fileno())
        else:
            with self.fs.open(path, "wb") as stream:
                yield stream

    def _write_bytes(self, path: str, data: bytes) -> dict[str, Any]:
        with self._open_durable(path) as stream:
            stream.write(data)
        return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    # -- finding and loading --------------------------------------------------------

    def get(self, checkpoint_id: str) -> CheckpointRecord | None:
        with self.sessions() as session:
            row = session.get(Checkpoint, checkpoint_id)
            return CheckpointRecord.from_row(row) if row else None

    def list_checkpoints(
        self, operation_id: str, *, include_all: bool = False
    ) -> list[CheckpointRecord]:
        """An operation's checkpoints, newest first; only committed ones unless `include_all`."""
        query = select(Checkpoint).where(Checkpoint.operation_id == operation_id)
        if not include_all:
            query = query.where(Checkpoint.status == "committed")
        query = query.order_by(Checkpoint.step.desc(), Checkpoint.created_at.desc())
        with self.sessions() as session:
            return [CheckpointRecord.from_row(row) for row in session.scalars(query)]

    def latest_good(self, operation_id: str) -> CheckpointRecord | None:
        """The newest committed checkpoint, by its row alone (files are checked on load)."""
        query = (
            select(Checkpoint)
            .where(
                Checkpoint.operation_id == operation_id,
                Checkpoint.status == "committed",
            )
            .order_by(Checkpoint.step.desc(), Checkpoint.created_at.desc())
            .limit(1)
        )
        with self.sessions() as session:
            row = session.scalars(query).first()
            return CheckpointRecord.from_row(row) if row else None

    def load(self, checkpoint_id: str) -> LoadedCheckpoint:
        """Load one committed checkpoint after verifying every file.

        Raises:
            CheckpointNotFound: no committed checkpoint has this id.
            CheckpointCorrupted: a file is missing, altered or unsafe; the checkpoint is marked corrupted.
        """
        check_safe_id(checkpoint_id, "checkpoint id")
        with self.sessions() as session:
            row = session.get(Checkpoint, checkpoint_id)
            if row is None or row.status != "committed":
                status = "missing" if row is None else row.status
                raise CheckpointNotFound(
                    row.operation_id if row else "?",
                    f"checkpoint {checkpoint_id} is {status}",
                )
            record = CheckpointRecord.from_row(row)
            manifest_sha = row.manifest_sha256
        try:
            state = self._read_verified(record, manifest_sha)
        except CheckpointCorrupted as err:
            self.mark_corrupted(record, err.reason)
            raise
        return LoadedCheckpoint(record=record, state=state)

    def load_latest_good(self, operation_id: str) -> LoadedCheckpoint:
        """The newest checkpoint that verifies, falling back past corrupted ones.

        Raises:
            CheckpointNotFound: the operation has no checkpoint that verifies.
        """
        skipped: list[tuple[str, str]] = []
        while (record := self.latest_good(operation_id)) is not None:
            try:
                loaded = self.load(record.id)
            except CheckpointCorrupted as err:
                skipped.append((record.id, err.reason))
                continue
            loaded.skipped = skipped
            return loaded
        detail = (
            f"{len(skipped)} corrupted checkpoint(s) skipped"
            if skipped
            else "none was committed"
        )
        raise CheckpointNotFound(operation_id, detail)

    def mark_corrupted(self, record: CheckpointRecord, reason: str) -> None:
        logger.error(
            "operation %s: checkpoint %s is corrupted and will not be used: %s",
            record.operation_id,
            record.id,
            reason,
        )
        with self.sessions.begin() as session:
            session.execute(
                update(Checkpoint)
                .where(Checkpoint.id == record.id, Checkpoint.status == "committed")
                .values(status="corrupted", status_reason=reason[:2000])
            )

    def load_meta(self, checkpoint_id: str) -> dict[str, Any]:
        """A committed checkpoint's non-tensor state (position, history, spec), its hash verified.

        Reads only the manifest and `state.json`, so it is cheap for checkpoints of any size.
        """
        record = self.get(check_safe_id(checkpoint_id, "checkpoint id"))
        if record is None or record.status not in ("committed", "pruned"):
            raise CheckpointNotFound(
                record.operation_id if record else "?",
                f"checkpoint {checkpoint_id} is not committed",
            )
        directory = self.checkpoint_dir(record.operation_id, record.id)
        try:
            with self.fs.open(f"{directory}/{MANIFEST}", "rb") as stream:
                manifest = json.loads(stream.read())
            with self.fs.open(f"{directory}/{STATE_FILE}", "rb") as stream:
                state_bytes = stream.read()
        except (FileNotFoundError, ValueError) as err:
            raise CheckpointCorrupted(
                record.id, f"its manifest or {STATE_FILE} cannot be read ({err})"
            ) from err
        if hashlib.sha256(state_bytes).hexdigest() != manifest.get("files", {}).get(
            STATE_FILE, {}
        ).get("sha256"):
            raise CheckpointCorrupted(
                record.id, f"{STATE_FILE} does not match its hash in the manifest"
            )
        meta: dict[str, Any] = json.loads(state_bytes)
        return meta

    def _read_verified(
        self, record: CheckpointRecord, manifest_sha: str | None
    ) -> TrainingState:
        directory = self.checkpoint_dir(record.operation_id, record.id)
        try:
            with self.fs.open(f"{directory}/{MANIFEST}", "rb") as stream:
                manifest_bytes = stream.read()
        except FileNotFoundError as err:
            raise CheckpointCorrupted(record.id, "its manifest is missing") from err
        if manifest_sha and hashlib.sha256(manifest_bytes).hexdigest() != manifest_sha:
            raise CheckpointCorrupted(
                record.id, "its manifest does not match the hash recorded at commit"
            )
        try:
            manifest = json.loads(manifest_bytes)
            files = manifest["files"]
            if manifest["format"] != MANIFEST_FORMAT or set(files) != {
                MODEL_FILE,
                TRAINING_FILE,
                STATE_FILE,
            }:
                raise ValueError(
                    f"unexpected format {manifest.get('format')!r} or files {sorted(files)}"
                )
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointCorrupted(
                record.id, f"its manifest is unreadable ({err})"
            ) from err

        tensors: dict[str, dict[str, Any]] = {}
        for name in (MODEL_FILE, TRAINING_FILE):
            expected = files[name]
            label = f"{record.id}/{name}"
            try:
                if self._local:
                    loaded, digest = map_tensor_file(f"{directory}/{name}", label)
                else:
                    with self.fs.open(f"{directory}/{name}", "rb") as stream:
                        loaded, digest = read_tensor_file(
                            stream, label, expected["size"]
                        )
            except FileNotFoundError as err:
                raise CheckpointCorrupted(record.id, f"{name} is missing") from err
            if digest != expected.get("sha256_chunks"):
                raise CheckpointCorrupted(
                    record.id, f"{name} does not match its hash in the manifest"
                )
            tensors[name] = loaded
        try:
            with self.fs.open(f"{directory}/{STATE_FILE}", "rb") as stream:
                state_bytes = stream.read()
        except FileNotFoundError as err:
            raise CheckpointCorrupted(record.id, f"{STATE_FILE} is missing") from err
        if hashlib.sha256(state_bytes).hexdigest() != files[STATE_FILE]["sha256"]:
            raise CheckpointCorrupted(
                record.id, f"{STATE_FILE} does not match its hash in the manifest"
            )

        flat = {MODEL_PREFIX + k: v for k, v in tensors[MODEL_FILE].items()}
        flat.update(tensors[TRAINING_FILE])
        return TrainingState(tensors=flat, meta=json.loads(state_bytes))

    # -- retention and cleanup ----------------------------------------------------

    def prune(self, operation_id: str, policy: CheckpointPolicy) -> list[str]:
        """Drop committed checkpoints beyond the policy; keeps the newest K, the best, and the final one."""
        good = self.list_checkpoints(operation_id)
        keep = {record.id for record in good[: policy.keep_last]}
        keep.update(record.id for record in good if record.kind == "final")
        metric = policy.keep_best_metric
        if metric is not None:
            scored = [r for r in good if isinstance(r.metrics.get(metric), int | float)]
            if scored:
                chooser = min if policy.best_mode == "min" else max
                keep.add(chooser(scored, key=lambda r: r.metrics[metric]).id)
        pruned = [record.id for record in good if record.id not in keep]
        for checkpoint_id in pruned:
            with self.sessions.begin() as session:
                session.execute(
                    update(Checkpoint)
                    .where(
                        Checkpoint.id == checkpoint_id, Checkpoint.status == "committed"
                    )
                    .values(status="pruned", status_reason="retention")
                )
            self._remove_files(operation_id, checkpoint_id)
        if pruned:
            logger.info(
                "operation %s: pruned %d checkpoint(s) by retention",
                operation_id,
                len(pruned),
            )
        return pruned

    def clean_staged_leftovers(self, operation_id: str | None = None) -> list[str]:
        """Remove the files of saves that stayed `staging` longer than `stale_after` (their writer died)."""
        cutoff = utcnow() - self.stale_after
        query = select(Checkpoint).where(
            Checkpoint.status == "staging", Checkpoint.created_at < cutoff
        )
        if operation_id is not None:
            query = query.where(Checkpoint.operation_id == operation_id)
        with self.sessions() as session:
            stale = [(row.operation_id, row.id) for row in session.scalars(query)]
        cleaned = []
        for op_id, checkpoint_id in stale:
            with self.sessions.begin() as session:
                taken = session.execute(
                    update(Checkpoint)
                    .where(
                        Checkpoint.id == checkpoint_id, Checkpoint.status == "staging"
                    )
                    .values(
                        status="abandoned",
                        status_reason="staged files of a save whose writer died",
                    )
                )
            if taken.rowcount == 1:  # type: ignore[attr-defined]
                self._remove_files(op_id, checkpoint_id)
                cleaned.append(checkpoint_id)
        if cleaned:
            logger.info(
                "removed %d staged leftover(s) of interrupted saves", len(cleaned)
            )
        return cleaned

    def _remove_files(self, operation_id: str, checkpoint_id: str) -> None:
        directory = self.checkpoint_dir(operation_id, checkpoint_id)
        if self.fs.exists(directory):
            self.fs.rm(directory, recursive=True)


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
