"""`bench`: an MLP of about 50 million parameters with Adam, for benchmarks and GPU runs.

Its checkpoint state (weights plus two Adam moments) is about 600 MB in float32.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from resumable.spec import TrainingSpec


class BenchRecipe:
    def __init__(
        self, width: int = 4096, depth: int = 3, features: int = 256, samples: int = 512
    ) -> None:
        self.width = width
        self.depth = depth
        self.features = features
        self.samples = samples

    def build_model(self, spec: TrainingSpec) -> nn.Module:
        layers: list[nn.Module] = [nn.Linear(self.features, self.width), nn.GELU()]
        for _ in range(self.depth):
            layers += [nn.Linear(self.width, self.width), nn.GELU()]
        layers.append(nn.Linear(self.width, self.features))
        return nn.Sequential(*layers)

    def build_optimizer(
        self, model: nn.Module, spec: TrainingSpec
    ) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=spec.learning_rate)

    def build_scheduler(
        self, optimizer: torch.optim.Optimizer, spec: TrainingSpec, steps_per_epoch: int
    ) -> torch.optim.lr_scheduler.LRScheduler | None:
        return None

    def build_dataset(self, spec: TrainingSpec) -> Dataset[tuple[torch.Tensor, ...]]:
        generator = torch.Generator().manual_seed(spec.seed + 3)
        inputs = torch.randn(self.samples, self.features, generator=generator)
        return TensorDataset(inputs, torch.tanh(inputs.flip(1)))

    def compute_loss(
        self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, Mapping[str, torch.Tensor]]:
        inputs, targets = batch
        loss = nn.functional.mse_loss(model(inputs), targets)
        return loss, {}
