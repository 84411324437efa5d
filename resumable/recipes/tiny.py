"""`tiny`: a small regression MLP with dropout, for tests; an epoch takes milliseconds."""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from resumable.spec import TrainingSpec


class TinyRecipe:
    """`seconds_per_batch` makes each step last at least that long, standing in for a heavier model in tests."""

    def __init__(
        self,
        samples: int = 96,
        features: int = 8,
        hidden: int = 16,
        seconds_per_batch: float = 0.0,
    ) -> None:
        self.samples = samples
        self.features = features
        self.hidden = hidden
        self.seconds_per_batch = seconds_per_batch

    def build_model(self, spec: TrainingSpec) -> nn.Module:
        # Dropout makes every step draw from the torch RNG, so a resume that lost
        # the RNG state would diverge at once.
        return nn.Sequential(
            nn.Linear(self.features, self.hidden),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(self.hidden, 1),
        )

    def build_optimizer(
        self, model: nn.Module, spec: TrainingSpec
    ) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=spec.learning_rate)

    def build_scheduler(
        self, optimizer: torch.optim.Optimizer, spec: TrainingSpec, steps_per_epoch: int
    ) -> torch.optim.lr_scheduler.LRScheduler | None:
        return torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=max(1, steps_per_epoch), gamma=0.9
        )

    def build_dataset(self, spec: TrainingSpec) -> Dataset[tuple[torch.Tensor, ...]]:
        generator = torch.Generator().manual_seed(spec.seed + 1)
        inputs = torch.randn(self.samples, self.features, generator=generator)
        weights = torch.randn(self.features, 1, generator=generator)
        targets = inputs @ weights + 0.1 * torch.randn(
            self.samples, 1, generator=generator
        )
        return TensorDataset(inputs, targets)

    def compute_loss(
        self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, Mapping[str, torch.Tensor]]:
        if self.seconds_per_batch:
            time.sleep(self.seconds_per_batch)
        inputs, targets = batch
        loss = nn.functional.mse_loss(model(inputs), targets)
        return loss, {"mse": loss.detach()}
