"""Training state as plain data: a tree of JSON values plus a flat map of named tensors.

Nothing here pickles. Nested containers of optimizers and schedulers are encoded so
that they come back with their original shape: dicts with non-string keys and tuples
are tagged, tensors are replaced by `{"__tensor__": key}` and stored beside the tree.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

JsonTree = Any

# Keys of model tensors in a `TrainingState`; the rest is optimizer, scheduler, scaler and RNG state.
MODEL_PREFIX = "model."


@dataclass
class TrainingState:
    """Everything needed to continue a run: `tensors` by key and `meta`, a JSON tree."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def encode_tree(value: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> JsonTree:
    """Encode `value` as JSON, moving each tensor into `tensors` under a key that starts with `prefix`."""
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value
        return {"__tensor__": prefix}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {
                k: encode_tree(v, f"{prefix}.{k}", tensors) for k, v in value.items()
            }
        return {
            "__dict__": [
                [k, encode_tree(v, f"{prefix}.{k}", tensors)] for k, v in value.items()
            ]
        }
    if isinstance(value, tuple):
        return {
            "__tuple__": [
                encode_tree(v, f"{prefix}.{i}", tensors) for i, v in enumerate(value)
            ]
        }
    if isinstance(value, list):
        return [encode_tree(v, f"{prefix}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(
        f"cannot store a {type(value).__name__} at {prefix!r} in a checkpoint; use plain data or tensors"
    )


def decode_tree(tree: JsonTree, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `encode_tree`."""
    if isinstance(tree, list):
        return [decode_tree(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if "__dict__" in tree:
        return {k: decode_tree(v, tensors) for k, v in tree["__dict__"]}
    if "__tuple__" in tree:
        return tuple(decode_tree(v, tensors) for v in tree["__tuple__"])
    if "__float__" in tree:
        return float(tree["__float__"])
    return {k: decode_tree(v, tensors) for k, v in tree.items()}


@dataclass
class RngState:
    """The state of every random generator a training step may draw from."""

    python: JsonTree
    numpy: JsonTree
    torch_cpu: torch.Tensor
    cuda: list[torch.Tensor]


def capture_rng_state() -> RngState:
    """The generators' states as the libraries give them; cheap, since it runs before every batch.

    Conversion to plain data happens only when a state is written (`rng_to_state`).
    """
    return RngState(
        python=random.getstate(),
        numpy=np.random.get_state(legacy=False),
        torch_cpu=torch.get_rng_state(),
        cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    )


def restore_rng_state(state: RngState) -> list[str]:
    """Restore every generator; returns warnings for states this machine cannot take."""
    warnings: list[str] = []
    random.setstate(state.python)
    np.random.set_state(state.numpy)
    torch.set_rng_state(state.torch_cpu.cpu())
    if state.cuda:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(state.cuda):
            torch.cuda.set_rng_state_all([t.cpu() for t in state.cuda])
        else:
            warnings.append(
                f"the checkpoint holds RNG state for {len(state.cuda)} CUDA device(s) that this machine does not have; "
                "CUDA random draws will differ from the interrupted run"
            )
    return warnings


def rng_to_state(rng: RngState, tensors: dict[str, torch.Tensor]) -> JsonTree:
    tensors["rng.torch_cpu"] = rng.torch_cpu
    for index, cuda_state in enumerate(rng.cuda):
        tensors[f"rng.cuda.{index}"] = cuda_state
    numpy_state = dict(rng.numpy)
    numpy_state["state"] = {
        k: (v.tolist() if isinstance(v, np.ndarray) else v)
        for k, v in rng.numpy["state"].items()
    }
    return {
        "python": encode_tree(rng.python, "python", {}),
        "numpy": numpy_state,
        "cuda_devices": len(rng.cuda),
    }


def rng_from_state(tree: JsonTree, tensors: dict[str, torch.Tensor]) -> RngState:
    numpy_state = dict(tree["numpy"])
    numpy_state["state"] = {
        k: (np.asarray(v, dtype=np.uint32) if isinstance(v, list) else v)
        for k, v in tree["numpy"]["state"].items()
    }
    return RngState(
        python=decode_tree(tree["python"], {}),
        numpy=numpy_state,
        torch_cpu=tensors["rng.torch_cpu"],
        cuda=[tensors[f"rng.cuda.{i}"] for i in range(tree["cuda_devices"])],
    )
