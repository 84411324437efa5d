"""A process killed while it writes a checkpoint leaves the previous one as the latest, loadable."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from resumable.checkpoints.store import CheckpointStore
from resumable.db import session_factory

pytestmark = pytest.mark.faults

SCRIPT = Path(__file__).parents[1] / "helpers" / "save_twice.py"


@pytest.mark.parametrize("point", ["save_write", "save_manifest", "save_commit"])
def test_sigkill_during_a_save_leaves_the_previous_checkpoint_latest(
    db_url: str, tmp_path: Path, operation_id: str, point: str
) -> None:
    plan = tmp_path / "faults.json"
    # The first save passes each point once; the fault waits for the second save's.
    plan.write_text(
        json.dumps([{"at": point, "action": "pass"}, {"at": point, "action": "kill"}])
    )
    root = (tmp_path / "checkpoints").as_uri()

    process = subprocess.run(
        [sys.executable, str(SCRIPT), db_url, root, operation_id],
        env={**__import__("os").environ, "RESUMABLE_FAULT_PLAN": str(plan)},
        timeout=120,
    )

    assert process.returncode == -signal.SIGKILL
    store = CheckpointStore(session_factory(db_url), root, stale_after_seconds=0.001)
    latest = store.latest_good(operation_id)
    assert (latest.epoch, latest.batch) == (0, 4)
    loaded = store.load_latest_good(operation_id)
    assert loaded.record.id == latest.id and not loaded.skipped
    staged = [
        r
        for r in store.list_checkpoints(operation_id, include_all=True)
        if r.status == "staging"
    ]
    assert len(staged) == 1
    assert store.clean_staged_leftovers(operation_id) == [staged[0].id]
    assert not Path(store.checkpoint_dir(operation_id, staged[0].id)).exists()
