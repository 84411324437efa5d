"""Faults caused on purpose, each with its expected outcome and a check that nothing is lost:
every committed checkpoint still loads and the operation stays resumable."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import fsspec
import psycopg
import pytest
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem
from sqlalchemy.engine import make_url

from resumable.checkpoints.saver import CheckpointSaver
from resumable.checkpoints.store import CheckpointStore
from resumable.db import session_factory
from resumable.errors import CheckpointSaveFailed
from resumable.spec import CheckpointPolicy, TrainingSpec
from resumable.training import Trainer

pytestmark = pytest.mark.faults

SPEC = TrainingSpec(recipe="tiny", epochs=3, batch_size=16)
HELPERS = Path(__file__).parents[1] / "helpers"


class _FullFile(MemoryFile):
    def write(self, data):  # type: ignore[no-untyped-def]
        if self.fs.used + len(data) > self.fs.capacity:
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")
        self.fs.used += len(data)
        return super().write(data)


class FullDiskFileSystem(MemoryFileSystem):
    """An in-memory filesystem with a capacity; writes past it fail with ENOSPC."""

    protocol = "fulldisk"
    capacity = 10**12
    used = 0

    def _open(self, path, mode="rb", **kwargs):  # type: ignore[no-untyped-def]
        file = super()._open(path, mode, **kwargs)
        if "w" in mode:
            file.__class__ = (
                _FullFile  # the same file, whose writes count against the capacity
            )
        return file


fsspec.register_implementation("fulldisk", FullDiskFileSystem, clobber=True)


def all_committed_load(store: CheckpointStore, operation_id: str) -> None:
    for record in store.list_checkpoints(operation_id):
        store.load(record.id)


@pytest.fixture
def full_disk_store(tmp_path: Path) -> CheckpointStore:
    FullDiskFileSystem.store = {}
    FullDiskFileSystem.pseudo_dirs = [""]
    FullDiskFileSystem.used = 0
    FullDiskFileSystem.capacity = 10**12
    return CheckpointStore(
        session_factory(f"sqlite:///{tmp_path / 'meta.db'}"),
        f"fulldisk://ckpt-{uuid.uuid4().hex[:6]}",
    )


@pytest.mark.parametrize("policy", ["continue", "stop"])
def test_a_full_disk_during_a_background_save_keeps_the_previous_checkpoint(
    full_disk_store: CheckpointStore, policy: str
) -> None:
    spec = SPEC.model_copy(
        update={"checkpoint": CheckpointPolicy(on_save_error=policy)}
    )
    trainer = Trainer(spec)
    saver = CheckpointSaver(
        full_disk_store,
        operation_id="op-full",
        flow_run_id=None,
        policy=spec.checkpoint,
    )
    trainer.train(max_batches=3)
    first = saver.save_blocking(trainer, "periodic")

    FullDiskFileSystem.capacity = (
        FullDiskFileSystem.used + 2000
    )  # room for part of one more checkpoint
    trainer.train(max_batches=3)
    saver.save_async(trainer)
    saver.wait()

    assert len(saver.failed_saves) == 1 and "No space left" in str(
        saver.failed_saves[0]
    )
    if policy == "stop":
        with pytest.raises(CheckpointSaveFailed, match="previous checkpoint is intact"):
            saver.check_failures()
    else:
        saver.check_failures()  # training goes on
        trainer.train(max_batches=2)
    assert full_disk_store.latest_good("op-full").id == first.id
    all_committed_load(full_disk_store, "op-full")
    abandoned = [
        r
        for r in full_disk_store.list_checkpoints("op-full", include_all=True)
        if r.status == "abandoned"
    ]
    assert len(abandoned) == 1 and "No space left" in abandoned[0].status_reason


def test_a_full_disk_during_a_cancellation_save_is_a_clear_error(
    full_disk_store: CheckpointStore,
) -> None:
    trainer = Trainer(SPEC)
    saver = CheckpointSaver(
        full_disk_store,
        operation_id="op-full",
        flow_run_id=None,
        policy=SPEC.checkpoint,
    )
    trainer.train(max_batches=3)
    first = saver.save_blocking(trainer, "periodic")
    FullDiskFileSystem.capacity = FullDiskFileSystem.used
    with pytest.raises(OSError, match="No space left"):
        saver.save_blocking(trainer, "cancellation")
    assert full_disk_store.load_latest_good("op-full").record.id == first.id


@pytest.mark.postgres
def test_the_database_connection_dropped_before_a_commit_is_survived(
    postgres_url: str, tmp_path: Path
) -> None:
    store = CheckpointStore(session_factory(postgres_url), (tmp_path / "ckpt").as_uri())
    operation_id = f"op-{uuid.uuid4().hex[:8]}"
    trainer = Trainer(SPEC)
    saver = CheckpointSaver(
        store, operation_id=operation_id, flow_run_id=None, policy=SPEC.checkpoint
    )
    trainer.train(max_batches=2)
    saver.save_blocking(trainer, "periodic")

    original_commit = store.commit
    url = make_url(postgres_url)

    def commit_after_the_connections_die(*args, **kwargs):  # type: ignore[no-untyped-def]
        admin = f"host={url.host} port={url.port or 5432} user={url.username} dbname=postgres"
        with psycopg.connect(admin, autocommit=True) as connection:
            killed = connection.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (url.database,),
            ).fetchone()
        assert killed[0] >= 1
        return original_commit(*args, **kwargs)

    store.commit = commit_after_the_connections_die  # type: ignore[method-assign]
    trainer.train(max_batches=2)
    record = saver.save_blocking(trainer, "periodic")

    assert store.latest_good(operation_id).id == record.id
    all_committed_load(store, operation_id)


def test_a_second_sigterm_during_the_cancellation_checkpoint_changes_nothing(
    tmp_path: Path,
) -> None:
    db_url = f"sqlite:///{tmp_path / 'meta.db'}"
    root = (tmp_path / "ckpt").as_uri()
    plan = tmp_path / "faults.json"
    plan.write_text(json.dumps([{"at": "save_write", "action": "sigterm"}]))
    process = subprocess.Popen(
        [sys.executable, str(HELPERS / "cancel_twice.py"), db_url, root, "op-twice"],
        env={**os.environ, "RESUMABLE_FAULT_PLAN": str(plan)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "ready"
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)

    assert process.returncode == 0
    epoch, batch, step = (int(n) for n in output.split()[1:4])
    store = CheckpointStore(session_factory(db_url), root)
    latest = store.load_latest_good("op-twice")
    assert (
        latest.record.kind,
        latest.record.epoch,
        latest.record.batch,
        latest.record.step,
    ) == ("cancellation", epoch, batch, step)
    assert (
        json.loads(plan.read_text()) == []
    )  # the second SIGTERM was delivered during the save
