"""Continue an operation from its latest good checkpoint in this (fresh) process; used by tests."""

import json
import sys

from resumable.checkpoints.saver import CheckpointSaver
from resumable.checkpoints.store import CheckpointStore
from resumable.db import session_factory
from resumable.spec import TrainingSpec
from resumable.training import Trainer

db_url, root, operation_id, spec_json, out = sys.argv[1:6]
spec = TrainingSpec.model_validate_json(spec_json)
store = CheckpointStore(session_factory(db_url), root)
trainer = Trainer(spec)
trainer.restore_state(store.load_latest_good(operation_id).state)
losses: list[float] = []
trainer.train(on_batch_end=lambda r: losses.append(r.loss))
CheckpointSaver(
    store, operation_id=operation_id, flow_run_id=None, policy=spec.checkpoint
).save_blocking(trainer, "final")
with open(out, "w") as stream:
    json.dump(losses, stream)
