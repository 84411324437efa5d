"""Helpers shared by the benchmarks: medians, the machine line, and rewriting one section of docs/benchmarks.md."""

from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
from pathlib import Path

import torch

DOC = Path(__file__).parents[1] / "docs" / "benchmarks.md"


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as stream:
            cpu = next(
                line.split(":", 1)[1].strip()
                for line in stream
                if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} cores ({cpu}), {gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def verdict(ratio: float, goal: float, higher_is_better: bool = False) -> str:
    met = ratio >= goal if higher_is_better else ratio <= goal
    return "met" if met else "**missed**"


def write_section(name: str, body: str) -> None:
    """Replace the section `name` of docs/benchmarks.md (between its markers), or append it."""
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    text = (
        DOC.read_text()
        if DOC.exists()
        else "# Benchmarks\n\nRun `make bench` to measure every row again.\n"
    )
    block = f"{start}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    text = (
        pattern.sub(lambda _: block, text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + block + "\n"
    )
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)


def git_revision() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
