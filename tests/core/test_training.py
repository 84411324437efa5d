"""Exact continuation: interrupted runs, restored from stored checkpoints alone, equal an uninterrupted run."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resumable.checkpoints.saver import CheckpointSaver
from resumable.checkpoints.store import CheckpointStore
from resumable.db import session_factory
from resumable.errors import DeviceUnavailable, IncompatibleCheckpoint
from resumable.faults import InjectedFault
from resumable.spec import TrainingSpec
from resumable.training import Trainer, resolve_device

SPEC = TrainingSpec(recipe="tiny", epochs=3, batch_size=16, seed=11)
TOTAL_BATCHES = 18  # 96 samples / 16 per batch * 3 epochs


@cache
def uninterrupted() -> tuple[list[float], dict[str, torch.Tensor], dict]:
    trainer = Trainer(SPEC)
    losses: list[float] = []
    trainer.train(on_batch_end=lambda r: losses.append(r.loss))
    return losses, _flat_state(trainer), trainer.optimizer.state_dict()


def _flat_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    state = trainer.capture_state()
    return {k: v.clone() for k, v in state.tensors.items() if not k.startswith("rng.")}


def assert_same_as_uninterrupted(trainer: Trainer, losses: list[float]) -> None:
    expected_losses, expected_tensors, _ = uninterrupted()
    assert losses == expected_losses
    actual = _flat_state(trainer)
    assert actual.keys() == expected_tensors.keys()
    for key, tensor in expected_tensors.items():
        assert torch.equal(actual[key], tensor), key


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    stops=st.lists(
        st.integers(min_value=1, max_value=TOTAL_BATCHES - 1),
        min_size=1,
        max_size=3,
        unique=True,
    )
)
def test_interrupted_runs_restored_from_the_store_match_an_uninterrupted_run(
    memory_store: CheckpointStore, stops: list[int]
) -> None:
    operation = f"op-{'-'.join(map(str, sorted(stops)))}-{id(stops)}"
    losses: list[float] = []
    done = 0
    for stop in [*sorted(stops), TOTAL_BATCHES]:
        trainer = Trainer(SPEC)
        if done:
            trainer.restore_state(memory_store.load_latest_good(operation).state)
        trainer.train(
            max_batches=stop - done, on_batch_end=lambda r: losses.append(r.loss)
        )
        saver = CheckpointSaver(
            memory_store,
            operation_id=operation,
            flow_run_id=None,
            policy=SPEC.checkpoint,
        )
        saver.save_async(trainer).result()
        saver.close()
        done = stop
    assert_same_as_uninterrupted(trainer, losses)


def test_a_fresh_process_continues_exactly(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'meta.db'}"
    root = (tmp_path / "checkpoints").as_uri()
    store = CheckpointStore(session_factory(db_url), root)
    trainer = Trainer(SPEC)
    losses: list[float] = []
    trainer.train(max_batches=7, on_batch_end=lambda r: losses.append(r.loss))
    saver = CheckpointSaver(
        store, operation_id="op-fresh", flow_run_id=None, policy=SPEC.checkpoint
    )
    saver.save_blocking(trainer, "cancellation")

    script = Path(__file__).parents[1] / "helpers" / "continue_in_process.py"
    out = tmp_path / "losses.json"
    subprocess.run(
        [
            sys.executable,
            str(script),
            db_url,
            root,
            "op-fresh",
            SPEC.model_dump_json(),
            str(out),
        ],
        check=True,
        timeout=120,
    )
    losses += json.loads(out.read_text())
    final = Trainer(SPEC)
    final.restore_state(store.load_latest_good("op-fresh").state)
    assert store.latest_good("op-fresh").kind == "final"
    assert_same_as_uninterrupted(final, losses)


@pytest.mark.faults
def test_a_failed_batch_is_saved_at_the_boundary_before_it(
    memory_store: CheckpointStore, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    plan = tmp_path / "faults.json"
    plan.write_text(
        json.dumps([{"at": "batch", "epoch": 1, "batch": 2, "action": "raise"}])
    )
    monkeypatch.setenv("RESUMABLE_FAULT_PLAN", str(plan))
    trainer = Trainer(SPEC)
    losses: list[float] = []
    with pytest.raises(InjectedFault):
        trainer.train(on_batch_end=lambda r: losses.append(r.loss))
    assert (trainer.epoch, trainer.batch) == (1, 2)
    saver = CheckpointSaver(
        memory_store, operation_id="op-failed", flow_run_id=None, policy=SPEC.checkpoint
    )
    saver.save_blocking(trainer, "failure", after_failure=True)

    resumed = Trainer(SPEC)
    resumed.restore_state(memory_store.load_latest_good("op-failed").state)
    resumed.train(on_batch_end=lambda r: losses.append(r.loss))
    assert_same_as_uninterrupted(resumed, losses)


def test_history_and_best_metric_survive_a_resume(
    memory_store: CheckpointStore,
) -> None:
    spec = SPEC.model_copy(
        update={
            "checkpoint": SPEC.checkpoint.model_copy(
                update={"keep_best_metric": "loss"}
            )
        }
    )
    whole = Trainer(spec)
    whole.train()
    part = Trainer(spec)
    part.train(max_batches=9)
    # Captured before another trainer reseeds the process-wide generators.
    state = part.capture_state()
    resumed = Trainer(spec)
    resumed.restore_state(state)
    resumed.train()

    def strip(history):
        return [
            {k: v for k, v in r.items() if k not in ("seconds", "samples_per_second")}
            for r in history
        ]

    assert strip(resumed.history) == strip(whole.history)
    assert resumed.best_metric == whole.best_metric


def test_restoring_onto_another_model_shape_lists_the_differences() -> None:
    trainer = Trainer(SPEC)
    state = trainer.capture_state()
    wider = TrainingSpec(
        recipe="tiny", recipe_options={"hidden": 32}, epochs=3, batch_size=16, seed=11
    )
    with pytest.raises(IncompatibleCheckpoint) as caught:
        Trainer(wider).restore_state(state, "ckpt-1")
    message = str(caught.value)
    assert "recipe_options" in message
    assert (
        "parameter 0.weight has shape [16, 8] in the checkpoint, [32, 8] in the model"
        in message
    )


def test_restoring_with_another_seed_is_refused() -> None:
    state = Trainer(SPEC).capture_state()
    with pytest.raises(IncompatibleCheckpoint, match="seed"):
        Trainer(SPEC.model_copy(update={"seed": 12})).restore_state(state)


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the error on a machine without CUDA"
)
def test_asking_for_cuda_without_one_fails_at_once() -> None:
    with pytest.raises(DeviceUnavailable, match="no usable CUDA device"):
        resolve_device("cuda")


def test_auto_device_picks_cuda_only_when_present() -> None:
    assert resolve_device("auto").type == (
        "cuda" if torch.cuda.is_available() else "cpu"
    )
