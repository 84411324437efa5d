"""Training recipes: the pluggable part that says what is trained and how.

A recipe builds the model, the optimizer, an optional LR scheduler and a map-style
dataset, and computes one step's loss and metrics. Shipped recipes are named
(`tiny`, `demo`, `bench`); users name their own as `package.module:factory`, where
`factory(**recipe_options)` returns an object with the `Recipe` methods.

Contract: every method must be deterministic given the torch RNG state and the spec,
and must not draw from any RNG the trainer does not capture (Python `random`, NumPy's
global generator and torch's CPU and CUDA generators are captured).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.data import Dataset

from resumable.errors import UnknownRecipe
from resumable.spec import TrainingSpec

SHIPPED_RECIPES = {
    "tiny": "resumable.recipes.tiny:TinyRecipe",
    "demo": "resumable.recipes.demo:DemoRecipe",
    "bench": "resumable.recipes.bench:BenchRecipe",
}


@runtime_checkable
class Recipe(Protocol):
    def build_model(self, spec: TrainingSpec) -> nn.Module: ...

    def build_optimizer(
        self, model: nn.Module, spec: TrainingSpec
    ) -> torch.optim.Optimizer: ...

    def build_scheduler(
        self, optimizer: torch.optim.Optimizer, spec: TrainingSpec, steps_per_epoch: int
    ) -> torch.optim.lr_scheduler.LRScheduler | None: ...

    def build_dataset(self, spec: TrainingSpec) -> Dataset[Any]: ...

    def compute_loss(
        self, model: nn.Module, batch: Any
    ) -> tuple[torch.Tensor, Mapping[str, torch.Tensor]]:
        """The loss to minimise and per-batch metrics (scalar tensors), averaged per epoch."""
        ...


def load_recipe(name: str, options: Mapping[str, Any] | None = None) -> Recipe:
    """Build the recipe `name` (a shipped name or `package.module:factory`) with `options`."""
    path = SHIPPED_RECIPES.get(name, name)
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        known = ", ".join(sorted(SHIPPED_RECIPES))
        raise UnknownRecipe(
            f"unknown recipe {name!r}: use one of {known} or an import path `package.module:factory`"
        )
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise UnknownRecipe(
            f"recipe {name!r} cannot be imported: {err}; check the import path"
        ) from err
    try:
        recipe = factory(**dict(options or {}))
    except TypeError as err:
        raise UnknownRecipe(
            f"recipe {name!r} refused its options {dict(options or {})!r}: {err}"
        ) from err
    if not isinstance(recipe, Recipe):
        raise UnknownRecipe(
            f"{path} did not return a recipe: it lacks the methods of `resumable.recipes.Recipe`"
        )
    return recipe
