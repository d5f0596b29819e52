"""Training throughput (images/s) of CIFAR knowledge distillation, resnet56 -> resnet20.

The same training steps two ways, on the device that is present (CUDA if available, else CPU):
  (a) kd_lightning: ``ResponseKD`` (T = 4, ce 0.1, kd 0.9; ``configs/cifar100/
      response_resnet56_resnet20.yaml``) in a ``pl.Trainer`` with ``precision="bf16-mixed"``;
  (b) a plain PyTorch loop: teacher forward without gradient, student forward, the same
      ``response_kd_loss``, backward, SGD step, all under ``torch.autocast(bfloat16)``.
Both use channels-last tensors (models and input batches; ``--no-channels-last`` turns it off),
SGD 0.05 / momentum 0.9 / weight decay 5e-4 as the CRD recipe, batch 64, and the same loader:
CIFAR-shaped random ``uint8`` images (no files needed) with the CIFAR augmentation (pad-4 crop +
flip, computed on the CPU as in real runs), or the real CIFAR-100 files with ``--real-data``. The
teacher has random weights: throughput does not depend on them. The first ``--warmup`` steps
(cuDNN autotuning, allocator, lazy initialisation) are not timed; the clock is synchronised with
the device at both ends. Both paths start from the same seed, so on CPU the two students should
end identical (reported as ``max_weight_diff``).

Prints one JSON line. Run: ``python benchmarks/gpu_throughput.py`` (on CPU it takes a few steps
only; ``--steps``/``--warmup`` to change).
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

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd_lightning.data import DistillDataModule  # noqa: E402
from kd_lightning.data.dataset import IndexedTensorDataset  # noqa: E402
from kd_lightning.losses import response_kd_loss  # noqa: E402
from kd_lightning.methods import ResponseKD  # noqa: E402
from kd_lightning.models import resnet20, resnet56  # noqa: E402

warnings.filterwarnings("ignore")
logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
logging.getLogger("lightning_fabric").setLevel(logging.ERROR)

T, CE_WEIGHT, KD_WEIGHT = 4.0, 0.1, 0.9
NUM_CLASSES = 100
CLOCK = time.perf_counter  # --cpu-time: process CPU time (CPU runs on a shared, busy machine)


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


class CifarData(DistillDataModule):
    """CIFAR-100 with augmentation; batches handed to the model in channels-last layout."""

    channels_last = True

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        x, y, index = batch
        return to_layout(x, self.channels_last), y, index


class SyntheticCifar(CifarData):
    """CIFAR-shaped random ``uint8`` images and labels, augmented like real CIFAR runs."""

    def __init__(self, n: int, batch_size: int) -> None:
        super().__init__("cifar100", batch_size=batch_size, augment=True, download=True)
        g = torch.Generator().manual_seed(0)
        self._x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
        self._y = torch.randint(0, NUM_CLASSES, (n,), generator=g)

    def prepare_data(self) -> None:
        pass

    def setup(self, stage=None) -> None:
        mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
        self.train_indices = torch.arange(len(self._y)).numpy()
        self.train_dataset = IndexedTensorDataset(self._x, self._y, None, mean, std, augment=True)


def to_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def models(device: torch.device, channels_last: bool):
    """A frozen random resnet56 teacher and a fresh resnet20 student (seeded by the caller)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    teacher = resnet56(num_classes=NUM_CLASSES).to(device, memory_format=fmt).eval().requires_grad_(False)
    student = resnet20(num_classes=NUM_CLASSES).to(device, memory_format=fmt)
    return teacher, student


class StepClock(Callback):
    """Wall time from the start of optimizer step ``warmup`` to the end of training."""

    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup, self.device, self.start, self.seconds = warmup, device, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.warmup and self.start is None:
            synchronize(self.device)
            self.start = CLOCK()

    def on_train_end(self, trainer, pl_module) -> None:
        synchronize(self.device)
        self.seconds = CLOCK() - self.start


def kd_lightning_run(dm, steps: int, warmup: int, seed: int, device: torch.device,
                     channels_last: bool, log_dir: str) -> tuple[float, torch.nn.Module]:
    pl.seed_everything(seed, verbose=False)
    teacher, student = models(device, channels_last)
    model = ResponseKD(student=student, teacher=teacher, temperature=T, ce_weight=CE_WEIGHT,
                       kd_weight=KD_WEIGHT, optimizer=sgd)
    clock = StepClock(warmup, device)
    pl.Trainer(max_steps=steps, limit_val_batches=0, accelerator=device.type, devices=1,
               precision="bf16-mixed", logger=pl.loggers.TensorBoardLogger(log_dir, name="gpu_throughput"),
               enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
               callbacks=[clock]).fit(model, dm)
    return clock.seconds, model.student


def plain_run(dm, steps: int, warmup: int, seed: int, device: torch.device,
              channels_last: bool) -> tuple[float, torch.nn.Module]:
    pl.seed_everything(seed, verbose=False)
    teacher, student = models(device, channels_last)
    opt = sgd(student.parameters())
    student.train()
    step, start = 0, None
    while step < steps:
        for x, y, _ in dm.train_dataloader():
            if step == warmup:
                synchronize(device)
                start = CLOCK()
            x = to_layout(x.to(device, non_blocking=True), channels_last)
            y = y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                with torch.no_grad():
                    t_logits = teacher(x)
                loss, _, _ = response_kd_loss(student(x), t_logits, y, T, CE_WEIGHT, KD_WEIGHT)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step == steps:
                break
    synchronize(device)
    return CLOCK() - start, student


def max_weight_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a.state_dict().values(), b.state_dict().values())
               if p.is_floating_point())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per run (default: 220 on CUDA, 6 on CPU)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed first steps (default: 20 on CUDA, 2 on CPU)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="alternating runs of each path; the median is reported (default: 3 on CUDA, 1 on CPU)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--real-data", action="store_true",
                        help="train on the CIFAR-100 files under --data-root instead of random images")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with process CPU time instead of wall time (CPU only)")
    args = parser.parse_args()
    global CLOCK
    if args.cpu_time:
        CLOCK = time.process_time
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    steps = args.steps or (220 if gpu else 6)
    warmup = args.warmup if args.warmup is not None else (20 if gpu else 2)
    repeats = args.repeats or (3 if gpu else 1)
    if not 0 <= warmup < steps:
        sys.exit(f"--warmup {warmup} must be >= 0 and below --steps {steps}")
    channels_last = not args.no_channels_last
    if args.real_data:
        dm = CifarData("cifar100", root=args.data_root, batch_size=args.batch_size, augment=True)
    else:
        dm = SyntheticCifar(n=args.batch_size * (steps + 1), batch_size=args.batch_size)
    dm.channels_last = channels_last
    dm.setup("fit")

    times = {"plain": [], "kd_lightning": []}
    diffs = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):  # alternating which path goes first
            students = {}
            for name in (("plain", "kd_lightning") if r % 2 == 0 else ("kd_lightning", "plain")):
                t, students[name] = (plain_run(dm, steps, warmup, r, device, channels_last)
                                     if name == "plain" else
                                     kd_lightning_run(dm, steps, warmup, r, device, channels_last, tmp))
                times[name].append(t)
            diffs.append(max_weight_diff(students["plain"], students["kd_lightning"]))
    images = (steps - warmup) * args.batch_size
    plain, kd = statistics.median(times["plain"]), statistics.median(times["kd_lightning"])
    print(json.dumps({
        "device": torch.cuda.get_device_name(device) if gpu else f"cpu ({os.cpu_count()} cores, "
                                                                  f"{torch.get_num_threads()} threads)",
        "torch": torch.__version__, "pytorch_lightning": pl.__version__,
        "data": "cifar100 files" if args.real_data else "synthetic 32x32 uint8 + crop/flip",
        "clock": "process_cpu_time" if args.cpu_time else "wall", "precision": "bf16-mixed", "channels_last": channels_last, "batch_size": args.batch_size,
        "timed_steps": steps - warmup, "warmup_steps": warmup, "repeats": repeats,
        "plain_images_per_s": round(images / plain, 1),
        "kd_lightning_images_per_s": round(images / kd, 1),
        "ratio_time_kd_lightning_over_plain": round(kd / plain, 3),
        "max_weight_diff": max(diffs),
        "times_plain_s": [round(t, 3) for t in times["plain"]],
        "times_kd_lightning_s": [round(t, 3) for t in times["kd_lightning"]]}))


if __name__ == "__main__":
    main()
