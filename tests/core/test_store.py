"""The checkpoint store on real SQLite and PostgreSQL: commit protocol, verification, retention, safety."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import timedelta
from pathlib import Path

import pytest
import safetensors.torch
import torch
from sqlalchemy import update

from resumable.checkpoints.saver import CheckpointSaver
from resumable.checkpoints.store import (
    MANIFEST,
    MODEL_FILE,
    TRAINING_FILE,
    CheckpointStore,
    check_safe_id,
)
from resumable.errors import (
    CheckpointLocationInvalid,
    CheckpointNotFound,
    UnsafeCheckpoint,
)
from resumable.models import Checkpoint, utcnow
from resumable.spec import CheckpointPolicy, TrainingSpec
from resumable.training import Trainer

SPEC = TrainingSpec(recipe="tiny", epochs=4, batch_size=16, seed=3)


def save_after(
    store: CheckpointStore,
    operation_id: str,
    batches: int,
    kind: str = "periodic",
    policy: CheckpointPolicy | None = None,
):
    trainer = Trainer(SPEC)
    trainer.train(max_batches=batches)
    saver = CheckpointSaver(
        store,
        operation_id=operation_id,
        flow_run_id=None,
        policy=policy or CheckpointPolicy(keep_last=100),
    )
    record = saver.save_blocking(trainer, kind)
    saver.close()
    return record


def checkpoint_path(store: CheckpointStore, record, name: str) -> Path:
    return Path(store.checkpoint_dir(record.operation_id, record.id)) / name


def test_a_staged_checkpoint_is_invisible_until_committed(
    store: CheckpointStore, operation_id: str
) -> None:
    trainer = Trainer(SPEC)
    trainer.train(max_batches=3)
    state = trainer.capture_state()
    checkpoint_id = store.begin(
        operation_id=operation_id, flow_run_id=None, kind="periodic", state=state
    )
    assert store.latest_good(operation_id) is None
    manifest_sha, size = store.write_files(operation_id, checkpoint_id, state)
    assert store.latest_good(operation_id) is None
    with pytest.raises(CheckpointNotFound):
        store.load_latest_good(operation_id)
    record = store.commit(checkpoint_id, manifest_sha, size)
    assert store.latest_good(operation_id) == record
    assert (
        record.status == "committed"
        and record.size_bytes == size
        and (record.epoch, record.batch) == (0, 3)
    )


def test_latest_is_the_newest_position(
    store: CheckpointStore, operation_id: str
) -> None:
    save_after(store, operation_id, 2)
    newest = save_after(store, operation_id, 9)
    assert store.latest_good(operation_id).id == newest.id
    assert store.load_latest_good(operation_id).state.meta["position"] == {
        "epoch": 1,
        "batch": 3,
        "step": 9,
    }


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "file", "reason"),
    [
        (_truncate, MODEL_FILE, "(ends inside tensor|but its header describes)"),
        (_flip_byte, TRAINING_FILE, "does not match its hash"),
        (Path.unlink, MANIFEST, "manifest is missing"),
        (Path.unlink, MODEL_FILE, "model.safetensors is missing"),
        (
            lambda p: p.write_text("{not json"),
            MANIFEST,
            "does not match the hash recorded",
        ),
        (
            lambda p: p.write_bytes(b"\xff" * 64),
            TRAINING_FILE,
            "header claims|not valid JSON",
        ),
    ],
)
@pytest.mark.faults
def test_loading_falls_back_past_a_damaged_checkpoint(
    store: CheckpointStore, operation_id: str, damage, file: str, reason: str
) -> None:
    good = save_after(store, operation_id, 4)
    bad = save_after(store, operation_id, 8)
    damage(checkpoint_path(store, bad, file))

    loaded = store.load_latest_good(operation_id)

    assert loaded.record.id == good.id
    assert [checkpoint_id for checkpoint_id, _ in loaded.skipped] == [bad.id]
    assert re.search(reason, loaded.skipped[0][1])
    marked = store.get(bad.id)
    assert marked.status == "corrupted" and re.search(reason, marked.status_reason)
    assert store.latest_good(operation_id).id == good.id


def test_no_good_checkpoint_left_is_checkpoint_not_found(
    store: CheckpointStore, operation_id: str
) -> None:
    only = save_after(store, operation_id, 4)
    _flip_byte(checkpoint_path(store, only, MODEL_FILE))
    with pytest.raises(CheckpointNotFound, match="1 corrupted checkpoint"):
        store.load_latest_good(operation_id)


def test_retention_keeps_the_newest_the_best_and_the_final(
    store: CheckpointStore, operation_id: str
) -> None:
    policy = CheckpointPolicy(keep_last=2, keep_best_metric="loss", best_mode="min")
    records = [save_after(store, operation_id, n, policy=policy) for n in (6, 12, 18)]
    final = save_after(store, operation_id, 24, kind="final", policy=policy)
    records += [
        save_after(store, operation_id, n, policy=policy) for n in (3, 2)
    ]  # older positions, newer saves

    kept = {r.id for r in store.list_checkpoints(operation_id)}
    best = min([*records[:3], final], key=lambda r: r.metrics["loss"])
    assert final.id in kept and best.id in kept
    assert records[2].id in kept  # the newest position is never pruned
    assert len(kept) <= 4
    for record in records:
        exists = checkpoint_path(store, record, MANIFEST).exists()
        assert exists == (record.id in kept), record


def test_staged_leftovers_of_a_dead_save_are_removed_but_a_save_in_progress_is_not(
    store: CheckpointStore, operation_id: str
) -> None:
    state = Trainer(SPEC).capture_state()
    dead = store.begin(
        operation_id=operation_id, flow_run_id=None, kind="periodic", state=state
    )
    store.write_files(operation_id, dead, state)
    in_progress = store.begin(
        operation_id=operation_id, flow_run_id=None, kind="periodic", state=state
    )
    store.write_files(operation_id, in_progress, state)
    with store.sessions.begin() as session:
        session.execute(
            update(Checkpoint)
            .where(Checkpoint.id == dead)
            .values(created_at=utcnow() - timedelta(hours=2))
        )

    assert store.clean_staged_leftovers(operation_id) == [dead]

    assert not Path(store.checkpoint_dir(operation_id, dead)).exists()
    assert store.get(dead).status == "abandoned"
    assert Path(store.checkpoint_dir(operation_id, in_progress), MANIFEST).exists()
    assert store.get(in_progress).status == "staging"


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.faults
def test_a_crafted_pickle_is_refused_without_running_it(
    store: CheckpointStore, operation_id: str, tmp_path: Path
) -> None:
    record = save_after(store, operation_id, 4)
    marker = tmp_path / "pwned"
    model_path = checkpoint_path(store, record, MODEL_FILE)
    torch.save({"weights": _RunsCode(str(marker))}, model_path)
    # The attacker also fixes the manifest and the row, so only the format check stands in the way.
    manifest_path = checkpoint_path(store, record, MANIFEST)
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][MODEL_FILE] = {
        "size": model_path.stat().st_size,
        "sha256_chunks": "matches",
    }
    manifest_path.write_text(json.dumps(manifest))
    with store.sessions.begin() as session:
        session.execute(
            update(Checkpoint)
            .where(Checkpoint.id == record.id)
            .values(
                manifest_sha256=hashlib.sha256(manifest_path.read_bytes()).hexdigest()
            )
        )

    with pytest.raises(UnsafeCheckpoint, match="never unpickles"):
        store.load(record.id)
    assert not marker.exists()
    assert store.get(record.id).status == "corrupted"

    plain = tmp_path / "model.pt"
    plain.write_bytes(model_path.read_bytes())
    torch.load(plain, weights_only=False)  # what a plain, unsafe load would have done
    assert marker.exists()


def test_model_files_are_readable_by_safetensors(
    store: CheckpointStore, operation_id: str
) -> None:
    record = save_after(store, operation_id, 5)
    loaded = safetensors.torch.load_file(checkpoint_path(store, record, MODEL_FILE))
    state = store.load(record.id).state
    assert loaded.keys() == {
        k.removeprefix("model.") for k in state.tensors if k.startswith("model.")
    }
    for name, tensor in loaded.items():
        assert torch.equal(tensor, state.tensors[f"model.{name}"])


@pytest.mark.parametrize(
    "bad",
    ["..", "../escape", "/etc/passwd", "s3://bucket/x", "a/b", "", "x" * 200, "op\x00"],
)
def test_locations_that_escape_the_root_are_refused(bad: str) -> None:
    with pytest.raises(CheckpointLocationInvalid):
        check_safe_id(bad, "operation id")


def test_a_checkpoint_loads_onto_the_cpu_whatever_wrote_it(
    store: CheckpointStore, operation_id: str
) -> None:
    record = save_after(store, operation_id, 4)
    state = store.load(record.id).state
    assert {t.device.type for t in state.tensors.values()} == {"cpu"}
