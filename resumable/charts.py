"""The loss curve of an operation: as text for Prefect markdown artifacts, and as a PNG file.

Both read the per-epoch history a checkpoint carries, which spans every attempt of the
operation, so the curve of a resumed operation is one continuous line.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_BLOCKS = " ▁▂▃▄▅▆▇█"


def text_chart(values: Sequence[float], *, height: int = 8, label: str = "loss") -> str:
    """A column chart in Unicode blocks, one column per epoch, with the range on the left."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return f"(no {label} recorded yet)"
    low, high = min(finite), max(finite)
    span = (high - low) or 1.0
    levels = [
        round((v - low) / span * (height * 8 - 1)) if math.isfinite(v) else 0
        for v in values
    ]
    rows = []
    for row in range(height - 1, -1, -1):
        cells = "".join(
            _BLOCKS[max(0, min(8, level - row * 8 + 1))] if level >= row * 8 else " "
            for level in levels
        )
        axis = (
            f"{high:>10.4f} ┤"
            if row == height - 1
            else f"{low:>10.4f} ┤"
            if row == 0
            else " " * 11 + "│"
        )
        rows.append(axis + cells)
    rows.append(" " * 11 + "└" + "─" * len(values))
    rows.append(" " * 12 + f"epochs 1–{len(values)}")
    return "\n".join(rows)


def loss_markdown(history: Sequence[dict[str, Any]], operation_id: str) -> str:
    losses = [float(record["loss"]) for record in history]
    lines = [
        f"### Loss per epoch, operation `{operation_id}`",
        "",
        "```",
        text_chart(losses),
        "```",
    ]
    if losses:
        lines += [
            "",
            f"Epoch 1: {losses[0]:.6f}; epoch {len(losses)}: {losses[-1]:.6f}.",
        ]
    return "\n".join(lines)


def write_loss_png(
    history: Sequence[dict[str, Any]], path: Path, *, title: str
) -> Path:
    """Draw loss (and any other per-epoch metric on a second axis) to a PNG file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [int(record["epoch"]) + 1 for record in history]
    figure, axis = plt.subplots(figsize=(7, 4), dpi=120)
    axis.plot(
        epochs,
        [record["loss"] for record in history],
        marker="o",
        label="loss",
        color="tab:blue",
    )
    axis.set_xlabel("epoch")
    axis.set_ylabel("loss")
    extra = [
        k
        for k in (history[0] if history else {})
        if k not in ("epoch", "loss", "lr", "seconds", "samples_per_second")
    ]
    if extra:
        other = axis.twinx()
        for name in extra[:2]:
            other.plot(
                epochs,
                [float(record.get(name, math.nan)) for record in history],
                marker=".",
                linestyle="--",
                label=name,
            )
        other.set_ylabel(", ".join(extra[:2]))
        other.legend(loc="upper right")
    axis.legend(loc="upper left")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path
