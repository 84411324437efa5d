"""Save one checkpoint, then a second one during which a fault plan may kill this process."""

import sys

from resumable.checkpoints.saver import CheckpointSaver
from resumable.checkpoints.store import CheckpointStore
from resumable.db import session_factory
from resumable.spec import TrainingSpec
from resumable.training import Trainer

db_url, root, operation_id = sys.argv[1:4]
spec = TrainingSpec(recipe="tiny", epochs=3, batch_size=16)
store = CheckpointStore(session_factory(db_url), root)
trainer = Trainer(spec)
saver = CheckpointSaver(
    store, operation_id=operation_id, flow_run_id=None, policy=spec.checkpoint
)
trainer.train(max_batches=4)
saver.save_blocking(trainer, "periodic")
trainer.train(max_batches=4)
saver.save_async(trainer)
saver.close()
