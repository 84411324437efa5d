"""Train until SIGTERM, then save a cancellation checkpoint while a second SIGTERM arrives (planned).

Stands for the flow's cancellation path: `StopRequests` turns SIGTERM into a request to
stop at the next batch boundary, and a second one while saving changes nothing.
"""

import sys

from resumable.checkpoints.saver import CheckpointSaver
from resumable.checkpoints.store import CheckpointStore
from resumable.db import session_factory
from resumable.spec import TrainingSpec
from resumable.training import Trainer
from tasks.control import StopRequests

db_url, root, operation_id = sys.argv[1:4]
spec = TrainingSpec(
    recipe="tiny", recipe_options={"seconds_per_batch": 0.05}, epochs=50, batch_size=16
)
store = CheckpointStore(session_factory(db_url), root)
trainer = Trainer(spec)
saver = CheckpointSaver(
    store, operation_id=operation_id, flow_run_id=None, policy=spec.checkpoint
)
with StopRequests(None) as stop:
    trainer.train(max_batches=1)
    print("ready", flush=True)
    trainer.train(should_stop=lambda: stop.requested)
    record = saver.save_blocking(trainer, "cancellation")
    saver.close()
print(f"saved {record.epoch} {record.batch} {record.step}", flush=True)
