"""Step time of WassersteinKD relative to ResponseKD on the MNIST-1D configs.

Builds both runs from ``configs/mnist1d/response.yaml`` and ``configs/mnist1d/wasserstein.yaml``
through the CLI (``run=False``: the same student, teacher, data and optimizer as a user gets),
then trains each for ``--steps`` optimizer steps without validation, alternating the two methods
``--repeats`` times in one process. A step is timed from ``on_train_batch_start`` to
``on_train_batch_end``: forward, (double) backward and optimizer step, data loading excluded
(divided by the group size when the config sets ``data.batches_per_step``).
The teacher logits come from the per-example cache in both methods.

Two clocks: wall time (``perf_counter``) and the CPU time of the training thread
(``thread_time``). On a machine shared with other jobs the wall time of a step also counts the
time the process waits for a core; the CPU time does not, so its ratio is the stable one. The
medians over all timed steps are reported for both.

The teacher checkpoint of the config is used when it exists (``kd-lightning fit --config
configs/mnist1d/teacher.yaml``); otherwise a randomly initialised teacher of the same
architecture is saved to a temporary file (the step time does not depend on its weights).

Prints one JSON line: median step times (ms) of both methods and their ratio (the target is at
most 2.0). Run with one thread, as the few-data study does::

    OMP_NUM_THREADS=1 python benchmarks/wasserstein_step.py
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock

import torch
from pytorch_lightning import Callback

REPO = Path(__file__).resolve().parents[1]
warnings.filterwarnings("ignore")
logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
logging.getLogger("lightning_fabric").setLevel(logging.ERROR)


class StepTimer(Callback):
    """Wall time of every training step (forward + backward + optimizer step)."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._start = (0.0, 0.0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = (time.perf_counter(), time.thread_time())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # with data.batches_per_step = k a Lightning batch is a group of k optimizer steps
        k = len(batch) if batch and isinstance(batch, list) and isinstance(batch[0], (tuple, list)) else 1
        self.wall.append((time.perf_counter() - self._start[0]) / k)
        self.cpu.append((time.thread_time() - self._start[1]) / k)


def teacher_checkpoint(tmp: str) -> str:
    path = REPO / "runs/mnist1d_teacher/checkpoints/best.ckpt"
    if path.is_file():
        return str(path)
    from kd_lightning.models import ConvNet1D

    fake = os.path.join(tmp, "teacher.pt")
    torch.save(ConvNet1D(num_classes=10, width=64).state_dict(), fake)
    return fake


def run(method: str, steps: int, ckpt: str, seed: int) -> tuple[list[float], list[float]]:
    from kd_lightning.cli import cli_main

    timer = StepTimer()
    args = ["--config", str(REPO / f"configs/mnist1d/{method}.yaml"),
            "--seed_everything", str(seed),
            "--model.init_args.teacher_checkpoint", ckpt,
            "--trainer.max_steps", str(steps), "--trainer.max_epochs", "-1",
            "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
            "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
            "--trainer.callbacks", "null",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    with mock.patch.object(sys, "argv", ["kd-lightning"]):
        cli = cli_main(args, run=False)
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, cli.datamodule)
    warm = len(timer.wall) // 10  # drop the warm-up batches
    return timer.wall[warm:], timer.cpu[warm:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per run")
    parser.add_argument("--repeats", type=int, default=6, help="runs per method (alternating)")
    opts = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    wall: dict[str, list[float]] = {"response": [], "wasserstein": []}
    cpu: dict[str, list[float]] = {"response": [], "wasserstein": []}
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # nothing is written into the repository
        ckpt = teacher_checkpoint(tmp)
        for r in range(opts.repeats):
            order = ("response", "wasserstein") if r % 2 == 0 else ("wasserstein", "response")
            for method in order:
                w, c = run(method, opts.steps, ckpt, seed=r)
                wall[method] += w
                cpu[method] += c
    mw = {k: statistics.median(v) * 1e3 for k, v in wall.items()}
    mc = {k: statistics.median(v) * 1e3 for k, v in cpu.items()}
    print(json.dumps({
        "benchmark": "wasserstein_step", "config": "configs/mnist1d/{response,wasserstein}.yaml",
        "batches_timed": {k: len(v) for k, v in wall.items()},
        "threads": torch.get_num_threads(),
        "response_step_ms": round(mw["response"], 4),
        "wasserstein_step_ms": round(mw["wasserstein"], 4),
        "ratio": round(mw["wasserstein"] / mw["response"], 3),
        "response_step_cpu_ms": round(mc["response"], 4),
        "wasserstein_step_cpu_ms": round(mc["wasserstein"], 4),
        "ratio_cpu": round(mc["wasserstein"] / mc["response"], 3),
    }))


if __name__ == "__main__":
    main()
