"""The trainer: runs a recipe batch by batch and can stop, capture and restore at any batch boundary.

Exactness rests on three rules:

1. The data order of an epoch is a permutation drawn from a generator seeded by
   (seed, epoch) alone, so the position in training is the pair (epoch, batch).
2. Every RNG a step may draw from is captured with the state and restored with it.
3. State is only captured at a batch boundary, where no update is half-applied.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import default_collate

from resumable import faults
from resumable.errors import (
    DeviceUnavailable,
    IncompatibleCheckpoint,
    InvalidSpec,
    ResumableError,
)
from resumable.recipes import Recipe, load_recipe
from resumable.spec import TrainingSpec
from resumable.state import (
    MODEL_PREFIX,
    TrainingState,
    capture_rng_state,
    decode_tree,
    encode_tree,
    restore_rng_state,
    rng_from_state,
    rng_to_state,
)

logger = logging.getLogger(__name__)

STATE_FORMAT = 1

StopReason = Literal["epoch_end", "limit", "stopped", "finished"]


class NonFiniteLoss(ResumableError, FloatingPointError):
    """A batch produced a NaN or infinite loss; the update was not applied."""


def resolve_device(requested: str) -> torch.device:
    """`auto` picks CUDA when present; `cuda` on a machine without one fails at once."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(
            "the spec asks for device 'cuda' but this machine has no usable CUDA device; "
            "use device 'auto' or 'cpu', or schedule the run on the GPU work pool"
        )
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def configure_determinism(enabled: bool) -> None:
    if enabled:
        # cuBLAS needs a fixed workspace to be deterministic; it must be set before CUDA starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.benchmark = not enabled


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + 17) % (2**63 - 1)


@dataclass
class BatchResult:
    epoch: int
    batch: int
    step: int
    loss: float


class Trainer:
    """Trains one spec; `train` runs from the current position until told to stop."""

    def __init__(
        self,
        spec: TrainingSpec,
        *,
        recipe: Recipe | None = None,
        device: torch.device | None = None,
    ) -> None:
        configure_determinism(spec.deterministic)
        self.spec = spec
        self.device = device or resolve_device(spec.device)
        self.recipe = recipe or load_recipe(spec.recipe, spec.recipe_options)

        # Seed before anything is built, so that initial weights depend on the seed alone.
        random.seed(spec.seed)
        np.random.seed(spec.seed % 2**32)
        torch.manual_seed(spec.seed)

        self.model = self.recipe.build_model(spec).to(self.device)
        self.optimizer = self.recipe.build_optimizer(self.model, spec)
        self.dataset = self.recipe.build_dataset(spec)
        self.samples = len(self.dataset)  # type: ignore[arg-type]
        if self.samples == 0:
            raise InvalidSpec(
                f"recipe {spec.recipe!r} built an empty dataset; nothing can be trained"
            )
        self.steps_per_epoch = math.ceil(self.samples / spec.batch_size)
        self.scheduler = self.recipe.build_scheduler(
            self.optimizer, spec, self.steps_per_epoch
        )
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=spec.amp and self.device.type == "cuda"
        )
        self._autocast_dtype = (
            torch.float16 if self.device.type == "cuda" else torch.bfloat16
        )

        self.epoch = 0
        self.batch = 0
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.best_metric: float | None = None
        self._sums: dict[str, float] = {}
        self._epoch_samples = 0
        self._epoch_seconds = 0.0
        self._order: torch.Tensor | None = None
        self._order_epoch = -1

        # What the failure path needs to save a consistent state after an exception.
        self._boundary_rng = capture_rng_state()
        self._updating = False

    @property
    def finished(self) -> bool:
        return self.epoch >= self.spec.epochs

    @property
    def total_batches(self) -> int:
        return self.spec.epochs * self.steps_per_epoch

    @property
    def batches_done(self) -> int:
        return self.epoch * self.steps_per_epoch + self.batch

    @property
    def is_consistent(self) -> bool:
        """False only while an update is being applied; then no state may be captured."""
        return not self._updating

    def batch_order(self, epoch: int) -> torch.Tensor:
        if self._order_epoch != epoch:
            generator = torch.Generator().manual_seed(epoch_seed(self.spec.seed, epoch))
            self._order = torch.randperm(self.samples, generator=generator)
            self._order_epoch = epoch
        assert self._order is not None
        return self._order

    def train(
        self,
        *,
        max_batches: int | None = None,
        until_epoch_end: bool = False,
        should_stop: Callable[[], bool] | None = None,
        on_batch_end: Callable[[BatchResult], None] | None = None,
    ) -> StopReason:
        """Train from the current position.

        Stops when training is finished, after `max_batches`, at the end of the current
        epoch if `until_epoch_end`, or when `should_stop()` (asked before every batch) is true.
        """
        done = 0
        while not self.finished:
            if max_batches is not None and done >= max_batches:
                return "limit"
            if should_stop is not None and should_stop():
                return "stopped"
            result = self._train_one_batch()
            done += 1
            if on_batch_end is not None:
                on_batch_end(result)
            if until_epoch_end and self.batch == 0:
                return "epoch_end"
        return "finished"

    def _train_one_batch(self) -> BatchResult:
        self._boundary_rng = capture_rng_state()
        started = time.perf_counter()
        order = self.batch_order(self.epoch)
        indices = order[
            self.batch * self.spec.batch_size : (self.batch + 1) * self.spec.batch_size
        ].tolist()
        batch = _to_device(
            default_collate([self.dataset[i] for i in indices]), self.device
        )

        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        autocast = (
            torch.autocast(self.device.type, dtype=self._autocast_dtype)
            if self.spec.amp
            else nullcontext()
        )
        with autocast:
            loss, metrics = self.recipe.compute_loss(self.model, batch)
        self.scaler.scale(loss).backward()
        loss_value = float(loss.detach())
        if faults.enabled() and faults.fire("batch", self.epoch, self.batch) == "nan":
            loss_value = float("nan")
        if not math.isfinite(loss_value):
            raise NonFiniteLoss(
                f"batch {self.batch} of epoch {self.epoch} gave a loss of {loss_value}; the update was not applied. "
                "Lower the learning rate or fix the data, then resume from the failure checkpoint"
            )

        # From here until the counters move, the state is half-applied and must not be captured.
        self._updating = True
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()
        size = len(indices)
        self._sums["loss"] = self._sums.get("loss", 0.0) + loss_value * size
        for name, value in metrics.items():
            self._sums[name] = self._sums.get(name, 0.0) + float(value) * size
        self._epoch_samples += size
        self._epoch_seconds += time.perf_counter() - started
        result = BatchResult(self.epoch, self.batch, self.step, loss_value)
        self.step += 1
        self.batch += 1
        if self.batch == self.steps_per_epoch:
            self._close_epoch()
        self._updating = False
        return result

    def _close_epoch(self) -> None:
        record: dict[str, Any] = {"epoch": self.epoch}
        record.update(
            {name: total / self._epoch_samples for name, total in self._sums.items()}
        )
        record["lr"] = float(self.optimizer.param_groups[0]["lr"])
        record["seconds"] = round(self._epoch_seconds, 6)
        record["samples_per_second"] = (
            self._epoch_samples / self._epoch_seconds if self._epoch_seconds else 0.0
        )
        self.history.append(record)
        metric = self.spec.checkpoint.keep_best_metric
        if metric is not None and metric in record:
            better = min if self.spec.checkpoint.best_mode == "min" else max
            self.best_metric = (
                record[metric]
                if self.best_metric is None
                else better(self.best_metric, record[metric])
            )
        self.epoch += 1
        self.batch = 0
        self._sums = {}
        self._epoch_samples = 0
        self._epoch_seconds = 0.0

    def latest_metrics(self) -> dict[str, float]:
        if not self.history:
            return {}
        return {
            k: v
            for k, v in self.history[-1].items()
            if isinstance(v, int | float) and k != "epoch"
        }

    def capture_state(self, *, after_failure: bool = False) -> TrainingState:
        """The whole training state at the current batch boundary, as live references.

        With `after_failure`, the RNG state is the one taken at the start of the failed
        batch, whose update was never applied.
        """
        if not self.is_consistent:
            raise ResumableError(
                f"cannot capture state in the middle of an update (epoch {self.epoch}, batch {self.batch}); "
                "the last periodic checkpoint is the newest consistent state"
            )
        tensors: dict[str, torch.Tensor] = {}
        for name, tensor in self.model.state_dict().items():
            tensors[MODEL_PREFIX + name] = tensor
        rng = self._boundary_rng if after_failure else capture_rng_state()
        meta: dict[str, Any] = {
            "format": STATE_FORMAT,
            "position": {"epoch": self.epoch, "batch": self.batch, "step": self.step},
            "spec": self.spec.model_dump(mode="json"),
            "fingerprint": self.spec.fingerprint(),
            "fingerprint_fields": self.spec.model_dump(
                mode="json", include=set(self.spec.fingerprint_fields())
            ),
            "param_shapes": {
                name: list(t.shape) for name, t in self.model.state_dict().items()
            },
            "optimizer": encode_tree(self.optimizer.state_dict(), "optim", tensors),
            "scheduler": encode_tree(self.scheduler.state_dict(), "sched", tensors)
            if self.scheduler
            else None,
            "scaler": encode_tree(self.scaler.state_dict(), "scaler", tensors),
            "rng": rng_to_state(rng, tensors),
            "history": list(self.history),
            "accumulators": {
                "sums": dict(self._sums),
                "samples": self._epoch_samples,
                "seconds": self._epoch_seconds,
            },
            "best_metric": self.best_metric,
            "device": self.device.type,
        }
        return TrainingState(tensors=tensors, meta=meta)

    def check_compatible(
        self, state: TrainingState, checkpoint_id: str = "(in memory)"
    ) -> None:
        """Raise `IncompatibleCheckpoint` listing every difference between `state` and this trainer."""
        differences = self.spec.differences_from(
            state.meta.get("fingerprint_fields", {})
        )
        ours = {name: list(t.shape) for name, t in self.model.state_dict().items()}
        theirs = state.meta.get("param_shapes", {})
        for name in sorted(set(ours) | set(theirs)):
            if name not in theirs:
                differences.append(f"parameter {name} is not in the checkpoint")
            elif name not in ours:
                differences.append(
                    f"parameter {name} is in the checkpoint but not in the model"
                )
            elif ours[name] != theirs[name]:
                differences.append(
                    f"parameter {name} has shape {theirs[name]} in the checkpoint, {ours[name]} in the model"
                )
        if differences:
            raise IncompatibleCheckpoint(checkpoint_id, differences)
        position = state.meta["position"]
        if position["epoch"] > self.spec.epochs:
            raise InvalidSpec(
                f"the checkpoint is at epoch {position['epoch']} but the spec asks for {self.spec.epochs} epochs; "
                "ask for at least as many epochs as the checkpoint has done"
            )

    def restore_state(
        self, state: TrainingState, checkpoint_id: str = "(in memory)"
    ) -> list[str]:
        """Continue from `state`; returns warnings (for example CUDA RNG state that cannot be applied)."""
        self.check_compatible(state, checkpoint_id)
        tensors = state.tensors
        model_state = {
            k[len(MODEL_PREFIX) :]: v
            for k, v in tensors.items()
            if k.startswith(MODEL_PREFIX)
        }
        self.model.load_state_dict(model_state)
        self.optimizer.load_state_dict(decode_tree(state.meta["optimizer"], tensors))
        if self.scheduler is not None and state.meta["scheduler"] is not None:
            self.scheduler.load_state_dict(
                decode_tree(state.meta["scheduler"], tensors)
            )
        self.scaler.load_state_dict(decode_tree(state.meta["scaler"], tensors))

        position = state.meta["position"]
        self.epoch, self.batch, self.step = (
            position["epoch"],
            position["batch"],
            position["step"],
        )
        self.history = list(state.meta["history"])
        self.best_metric = state.meta["best_metric"]
        accumulators = state.meta["accumulators"]
        self._sums = dict(accumulators["sums"])
        self._epoch_samples = accumulators["samples"]
        self._epoch_seconds = accumulators["seconds"]

        # RNG last: loading the other parts must not draw from the generators after this.
        rng = rng_from_state(state.meta["rng"], tensors)
        warnings = restore_rng_state(rng)
        self._boundary_rng = rng
        for warning in warnings:
            logger.warning("checkpoint %s: %s", checkpoint_id, warning)
        return warnings


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, list | tuple):
        return type(batch)(_to_device(item, device) for item in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch
