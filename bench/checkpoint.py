"""Checkpoint costs on the `bench` recipe's state, side by side with `torch.save` + fsync and `torch.load`.

Measures, in one run and on one disk, medians of `--repeats` repetitions:
- the time training is blocked by an asynchronous save (the host snapshot) against `torch.save` + fsync;
- the full durable save (write, hash, fsync, commit) against `torch.save` + fsync;
- load with verification (every SHA-256 checked) against `torch.load(weights_only=True)`;
- peak extra memory during a save against the state's size.

Usage: python bench/checkpoint.py [--repeats 5] [--dir PATH] [--no-write]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, median, verdict, write_section

from resumable.checkpoints.saver import CheckpointSaver
from resumable.checkpoints.store import CheckpointStore
from resumable.db import session_factory
from resumable.spec import CheckpointPolicy, TrainingSpec
from resumable.training import Trainer


def rss_bytes() -> int:
    with open("/proc/self/statm") as stream:
        return int(stream.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Samples the resident set size every 2 ms on a thread, keeping the peak."""

    def __enter__(self) -> PeakRss:
        self.start = rss_bytes()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def torch_save_fsync(trainer: Trainer, path: Path) -> float:
    started = time.perf_counter()
    with open(path, "wb") as stream:
        torch.save(
            {
                "model": trainer.model.state_dict(),
                "optimizer": trainer.optimizer.state_dict(),
            },
            stream,
        )
        stream.flush()
        os.fsync(stream.fileno())
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="folder on the disk to measure (default: a temporary folder)",
    )
    parser.add_argument(
        "--no-write",
        action="store_true",
        help="print the table without rewriting docs/benchmarks.md",
    )
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    spec = TrainingSpec(recipe="bench", epochs=1, batch_size=32, seed=0)
    trainer = Trainer(spec)
    trainer.train(max_batches=1)  # populate Adam's moments
    state_bytes = trainer.capture_state().nbytes()
    workdir = Path(tempfile.mkdtemp(prefix="resumable-bench-", dir=args.dir))
    store = CheckpointStore(
        session_factory(f"sqlite:///{workdir / 'meta.db'}"), (workdir / "ckpt").as_uri()
    )
    saver = CheckpointSaver(
        store,
        operation_id="bench",
        flow_run_id=None,
        policy=CheckpointPolicy(keep_last=2),
    )
    baseline_file = workdir / "baseline.pt"

    # Memory is counted from before the saver's host buffers exist: they are part of its cost.
    memory = PeakRss().__enter__()
    saver.prepare(trainer)
    saver.wait()
    started = time.perf_counter()
    future = saver.save_async(trainer)
    first_blocked = time.perf_counter() - started
    future.result()
    saver.save_blocking(trainer, "periodic")
    memory.__exit__()
    extra_memory = (memory.peak - memory.start) / state_bytes

    rows: dict[str, list[float]] = {
        k: []
        for k in ("torch_save", "blocked", "durable", "torch_load", "verified_load")
    }
    for _ in range(args.repeats):
        gc.collect()
        rows["torch_save"].append(torch_save_fsync(trainer, baseline_file))

        started = time.perf_counter()
        future = saver.save_async(trainer)
        rows["blocked"].append(time.perf_counter() - started)
        future.result()

        started = time.perf_counter()
        record = saver.save_blocking(trainer, "periodic")
        rows["durable"].append(time.perf_counter() - started)

        started = time.perf_counter()
        loaded = torch.load(baseline_file, weights_only=True)
        rows["torch_load"].append(time.perf_counter() - started)
        del loaded
        started = time.perf_counter()
        state = store.load(record.id).state
        rows["verified_load"].append(time.perf_counter() - started)
        del state
    saver.close()

    save_s, load_s = median(rows["torch_save"]), median(rows["torch_load"])
    results = [
        (
            "training blocked by an asynchronous save",
            median(rows["blocked"]),
            save_s,
            0.15,
            "torch.save + fsync",
        ),
        (
            "durable save (write, SHA-256, fsync, commit)",
            median(rows["durable"]),
            save_s,
            1.3,
            "torch.save + fsync",
        ),
        (
            "load with verification",
            median(rows["verified_load"]),
            load_s,
            1.3,
            "torch.load(weights_only=True)",
        ),
    ]
    lines = [
        "## Checkpoint costs",
        "",
        f"`bench` recipe state: {state_bytes / 1e6:.0f} MB (model and Adam moments, float32), {args.repeats} repetitions, medians.",
        f"Machine: {machine()}.",
        f"Command: `python bench/checkpoint.py --repeats {args.repeats}` (run by `make bench`).",
        "",
        "| measure | resumable | baseline | baseline is | ratio | goal | |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, ours, theirs, goal, baseline in results:
        ratio = ours / theirs
        lines.append(
            f"| {name} | {ours:.3f} s | {theirs:.3f} s | {baseline} | {ratio:.2f}× | ≤ {goal}× | {verdict(ratio, goal)} |"
        )
    lines.append(
        f"| peak extra memory while saving | {extra_memory:.2f}× the state | | the state's size | {extra_memory:.2f}× | ≤ 1.2× | {verdict(extra_memory, 1.2)} |"
    )
    lines += [
        "",
        f"The host buffers are reserved in the background (`CheckpointSaver.prepare`); the first save after that blocked training for {first_blocked:.3f} s.",
        "Peak extra memory is the highest resident size over every save in the run, measured from before those buffers existed; it includes them.",
        "Load with verification maps each local tensor file copy-on-write (no copy) and checks every chunk's SHA-256 on all cores; remote stores are read into fresh tensors instead.",
    ]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        write_section("checkpoint", table)


if __name__ == "__main__":
    main()
