"""What a training run is asked to do: `TrainingSpec` and its checkpoint policy.

Resuming rules, applied by `TrainingSpec.check_resume_compatible` and the trainer:

- From the checkpoint: everything in the fingerprint (recipe and its options, seed,
  batch size, learning rate, AMP) plus the whole training state.
- From a new request: the number of epochs (not below the checkpoint's position),
  the device and the checkpoint policy.
- Refused: any change to a fingerprinted field; the error lists each difference.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, model_validator

Device = Literal["auto", "cpu", "cuda"]

# Fields that shape the model, the data order or the optimisation path; a checkpoint
# only continues a spec whose values for these are equal.
FINGERPRINT_FIELDS = (
    "recipe",
    "recipe_options",
    "seed",
    "batch_size",
    "learning_rate",
    "amp",
)


class CheckpointPolicy(BaseModel):
    """When to checkpoint and what to keep.

    Intervals are counted from the start of the run, so the first epoch counts.
    Cancellation, failure and final checkpoints are saved whatever the policy says.
    `on_save_error` decides what a failed periodic save (a full disk, a lost bucket) does:
    `continue` trains on with the previous checkpoint as the latest, `stop` fails the run.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    every_epochs: int | None = Field(default=1, ge=1, le=100_000)
    every_seconds: float | None = Field(default=None, ge=1.0, le=7 * 24 * 3600.0)
    keep_last: int = Field(default=3, ge=1, le=10_000)
    keep_best_metric: str | None = Field(default=None, min_length=1, max_length=64)
    best_mode: Literal["min", "max"] = "min"
    on_save_error: Literal["continue", "stop"] = "continue"


class TrainingSpec(BaseModel):
    """A training run, complete enough to be repeated exactly."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    recipe: str = Field(
        min_length=1,
        max_length=200,
        description="A shipped recipe name or `package.module:factory`.",
    )
    recipe_options: dict[str, JsonValue] = Field(default_factory=dict)
    epochs: int = Field(ge=1, le=100_000)
    batch_size: int = Field(default=32, ge=1, le=1_000_000)
    learning_rate: float = Field(default=1e-3, gt=0.0, le=10.0)
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    device: Device = "auto"
    amp: bool = False
    deterministic: bool = True
    checkpoint: CheckpointPolicy = Field(default_factory=CheckpointPolicy)

    @model_validator(mode="after")
    def _check_options_serialisable(self) -> TrainingSpec:
        try:
            json.dumps(self.recipe_options, sort_keys=True, allow_nan=False)
        except ValueError as err:
            raise ValueError(
                f"recipe_options must be finite JSON values: {err}"
            ) from err
        return self

    def fingerprint_fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in FINGERPRINT_FIELDS}

    def fingerprint(self) -> str:
        """SHA-256 of the fields that must match for a checkpoint to continue this spec."""
        canonical = json.dumps(
            self.fingerprint_fields(), sort_keys=True, separators=(",", ":")
        )
        return hashlib.sha256(canonical.encode()).hexdigest()

    def differences_from(self, fields: dict[str, Any]) -> list[str]:
        """Each fingerprinted field whose value differs from `fields`, as `name: theirs -> ours`."""
        ours = json.loads(json.dumps(self.fingerprint_fields(), sort_keys=True))
        return [
            f"{name}: {fields.get(name)!r} in the checkpoint, {ours[name]!r} requested"
            for name in FINGERPRINT_FIELDS
            if fields.get(name) != ours[name]
        ]
