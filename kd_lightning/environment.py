"""The environment a run or study ran in: versions, CPU and its kernels, threads, device.

float32 results depend on it: the SIMD kernels MKL and ATen pick for the CPU (AVX-512, AVX2) and
the number of threads change the order in which reductions add up, so the same seed gives results
that differ within float32 rounding, and a multi-batch training moves within its seed spread.
:func:`describe` says which ran; a ``kd-lightning fit`` run writes it to ``environment.json`` in
its log folder (:class:`RecordEnvironment`), a study to ``study.json`` and under its table.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from pytorch_lightning.callbacks import Callback

#: environment variables that change which kernels run or how many threads they use
OVERRIDES = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA",
             "DNNL_MAX_CPU_ISA", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what the platform says)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(trainer=None) -> dict:
    """Versions, CPU, torch's CPU kernels and threads, the kernel overrides set, and (given a
    trainer) its accelerator, device count and GPU name."""
    import pytorch_lightning
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "pytorch_lightning": pytorch_lightning.__version__, "cpu": cpu_model(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "threads": torch.get_num_threads(),
           "overrides": {k: os.environ[k] for k in OVERRIDES if k in os.environ}}
    if trainer is not None:
        device = trainer.strategy.root_device
        env.update(accelerator=type(trainer.accelerator).__name__.replace("Accelerator", "").lower(),
                   devices=trainer.num_devices, num_nodes=trainer.num_nodes,
                   gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    return env


def summary(env: dict) -> str:
    """One line: ``torch 2.x, pytorch-lightning 2.x, Python 3.11; <CPU> (AVX512 kernels), 1 thread;
    cpu``."""
    overrides = ", ".join(f"{k}={v}" for k, v in env.get("overrides", {}).items())
    threads = env.get("threads")
    device = env.get("gpu") or env.get("accelerator")
    if device and (env.get("devices") or 1) * (env.get("num_nodes") or 1) > 1:
        device += f" x {env.get('devices')}" + (f" x {env['num_nodes']} nodes"
                                                if (env.get("num_nodes") or 1) > 1 else "")
    return (f"torch {env.get('torch')}, pytorch-lightning {env.get('pytorch_lightning')}, Python "
            f"{env.get('python')}; {env.get('cpu')} ({env.get('cpu_capability')} kernels"
            + (f", {overrides}" if overrides else "") + ")"
            + (f", {threads} thread{'s' if threads != 1 else ''}" if threads else "")
            + (f"; {device}" if device else ""))


class RecordEnvironment(Callback):
    """Writes :func:`describe` into ``environment.json`` in the run's log folder when a fit starts
    (rank 0; nothing without a logger). A resumed run appends its own record: the file holds a
    list, one per start of ``fit`` in that folder."""

    def on_fit_start(self, trainer, pl_module) -> None:
        if not trainer.loggers:
            return
        log_dir = trainer.log_dir  # every rank: a broadcast under DDP
        if log_dir is None or not trainer.is_global_zero:
            return
        env, path = describe(trainer), Path(log_dir) / "environment.json"
        try:
            records = json.loads(path.read_text()) if path.is_file() else []
        except ValueError:
            records = []
        records = records if isinstance(records, list) else [records]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([*records, env], indent=2) + "\n")
